"""Prompts: where they come from (a list, a file, the shipped default), their tokens, their completions.

Every entry point that decodes (generate.py, the Lightning DataModule, the Python API) encodes and
decodes text here, so a prompt becomes the same token ids everywhere: the beginning-of-sequence token
when the tokenizer has one, then the text without special tokens (as the models saw in pretraining,
see ``polar_sparsity.data.tokens``).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.resources import asset_path
from polar_sparsity.schema import check_prompts

DEFAULT_PROMPTS = "prompts/default.jsonl"  # under polar_sparsity/assets
_FILE_KINDS = (".jsonl", ".txt")


def resolve_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts given, else those of ``prompts_file``, else the shipped default prompts."""
    if prompts is not None:
        check_prompts(prompts, "prompts")
        return [str(prompt) for prompt in prompts]
    return read_prompts_file(prompts_file or asset_path(DEFAULT_PROMPTS))


def read_prompts_file(path: str | Path) -> list[str]:
    """A ``.jsonl`` file (one ``{"prompt": "..."}`` object per line) or a ``.txt`` file (one per line)."""
    path = Path(path)
    if path.suffix not in _FILE_KINDS:
        raise ValueError(
            f"prompts_file={str(path)!r}: use a .jsonl or .txt file (got {path.suffix or 'none'})"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts_file={str(path)!r} does not exist (relative paths start at {Path.cwd()})"
        )
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    prompts = (
        [_jsonl_prompt(path, n, line) for n, line in lines]
        if path.suffix == ".jsonl"
        else [line for _, line in lines]
    )
    check_prompts(prompts, f"prompts_file={str(path)!r}")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from error
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(
            f'{path}:{number} needs a "prompt" string, e.g. {{"prompt": "The import statement"}}'
        )
    return record["prompt"]


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt: the beginning-of-sequence token (when there is one), then the text."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def check_lengths(token_ids: list[list[int]], max_new_tokens: int, max_positions: int) -> int:
    """The longest sequence a batch can reach (prompt + new tokens); refuses what the model cannot hold."""
    longest = max(len(ids) for ids in token_ids)
    if longest + max_new_tokens > max_positions:
        index = max(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        room = max_positions - longest
        fix = f"lower decode.max_new_tokens to {room}" if room > 0 else "shorten it"
        raise ValueError(
            f"prompt {index} has {longest} tokens; with decode.max_new_tokens={max_new_tokens} it needs "
            f"{longest + max_new_tokens} positions, but the model holds {max_positions}: {fix}"
        )
    return longest + max_new_tokens


def completion_text(tokenizer: Tokenizer, new_tokens: list[int]) -> str:
    """The generated text, without special tokens (the end-of-text token a sequence stopped at)."""
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
