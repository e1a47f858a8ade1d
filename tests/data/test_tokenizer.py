"""The shipped byte-level BPE tokenizer."""

from polar_sparsity.data.tokenizer import EOS_TOKEN, PAD_TOKEN, VOCAB_SIZE, load_tokenizer


def test_vocabulary_and_special_tokens() -> None:
    tok = load_tokenizer()
    assert len(tok) == VOCAB_SIZE == 2048
    assert tok.convert_ids_to_tokens([0, 1]) == [EOS_TOKEN, PAD_TOKEN]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)


def test_byte_level_round_trip_of_any_text() -> None:
    tok = load_tokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcödé, 漢字, emoji 🐍\t"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges learned: fewer tokens than bytes
