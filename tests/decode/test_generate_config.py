"""generate's config and prompts: bad input fails before any model loads, naming the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from polar_sparsity.data.tokenizer import load_tokenizer
from polar_sparsity.decode.api import compose_settings
from polar_sparsity.decode.prompts import check_lengths, encode_prompts, read_prompts_file, resolve_prompts
from polar_sparsity.schema import DecodeBackend, Mode
from tests.decode.conftest import ROOT, generate_settings


def test_defaults_compose_to_dense_tiny_opt_with_the_shipped_prompts(tmp_path: Path) -> None:
    settings, _ = generate_settings(tmp_path)
    assert settings.mode == Mode.dense and settings.model.name == "tiny-opt"
    assert settings.decode.backend == DecodeBackend.auto and settings.decode.temperature == 0.0
    assert settings.paths.routers == f"{tmp_path}/routers/tiny-opt/python-docs"
    assert settings.sparsity.dense_attn_layers == [0] and settings.sparsity.attn_topk == 0.5
    prompts = resolve_prompts(settings.prompts, settings.prompts_file)
    assert len(prompts) >= 4 and all(p.strip() for p in prompts)


def test_prompts_from_the_command_line(tmp_path: Path) -> None:
    settings, _ = generate_settings(
        tmp_path, 'prompts=["The import statement","A dictionary"]', "mode=sparse"
    )
    assert resolve_prompts(settings.prompts, settings.prompts_file) == [
        "The import statement",
        "A dictionary",
    ]
    assert settings.mode == Mode.sparse


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("decode.max_new_tokens=0", r"decode.max_new_tokens=0 must be a positive integer"),
        ("decode.temperature=-0.5", r"decode.temperature=-0.5 must be >= 0"),
        ("decode.top_p=0", r"decode.top_p=0.0 must be in \(0, 1\]"),
        ("decode.top_p=1.5", r"decode.top_p=1.5 must be in \(0, 1\]"),
        ("decode.batch_size=0", r"decode.batch_size=0 must be a positive integer"),
        ("mode=sparse_attn", r"mode=sparse_attn is an evaluation mode .* supports mode=dense, sparse"),
        ("mode=random_attn", r"mode=random_attn is an evaluation mode"),
        ("sparsity.attn_topk=0", r"sparsity.attn_topk=0.0 must be a fraction in \(0, 1\]"),
        ("sparsity.positions=last:4", r"sparsity.positions=last:4 applies to evaluate.py only"),
        ("prompts=[]", r"prompts holds no prompts"),
        ('prompts=["ok"," "]', r"prompts: prompt\(s\) \[1\] are empty"),
        ("prompts=[a]", r"give either prompts=\[...\] or prompts_file=PATH, not both"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, override: str, message: str) -> None:
    extra = ["prompts_file=x.txt"] if override == "prompts=[a]" else []
    with pytest.raises(ValueError, match=message):
        generate_settings(tmp_path, override, *extra)


def test_unknown_mode_and_backend_name_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        generate_settings(tmp_path, "mode=spares")
    assert "dense" in str(info.value.__cause__) and "sparse" in str(info.value.__cause__)
    with pytest.raises(ConfigCompositionException) as info:
        generate_settings(tmp_path, "decode.backend=cuda")
    assert "triton" in str(info.value.__cause__) and "torch" in str(info.value.__cause__)


def test_prompts_files(tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  second one\n")
    assert read_prompts_file(txt) == ["first prompt", "  second one"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "def f(x):\\n    return"}\n{"prompt": "B", "id": 7}\n')
    assert read_prompts_file(jsonl) == ["def f(x):\n    return", "B"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, r"prompts_file='.*missing.jsonl' does not exist"),
        ("prompts.csv", "a,b\n", r"use a .jsonl or .txt file \(got .csv\)"),
        ("empty.txt", "\n\n", r"holds no prompts"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"bad.jsonl:2 is not valid JSON"),
        ("field.jsonl", '{"text": "a"}\n', r'field.jsonl:1 needs a "prompt" string'),
    ],
)
def test_bad_prompts_files_are_refused(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolve_prompts(None, str(path))


def test_prompts_start_with_bos_and_lengths_are_checked() -> None:
    tokenizer = load_tokenizer()
    ids = encode_prompts(tokenizer, ["The import statement", "A"])
    assert ids[0][0] == tokenizer.bos_token_id and ids[1][0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[0][1:]) == "The import statement"
    assert check_lengths(ids, 10, 512) == len(ids[0]) + 10
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; with decode.max_new_tokens=510 .* lower"):
        check_lengths(ids, 510, 512)


def test_the_api_composes_the_cli_config(tmp_path: Path) -> None:
    settings = compose_settings(
        "tiny-llama", "sparse", [f"paths.artifacts={tmp_path}"], decode={"batch_size": 3}
    )
    assert settings.model.name == "tiny-llama" and settings.mode == Mode.sparse
    assert settings.decode.batch_size == 3 and settings.decode.max_new_tokens == 64
    assert settings.paths.routers == f"{tmp_path}/routers/tiny-llama/python-docs"
    with pytest.raises(ValueError, match=r"decode.top_p=2.0 must be in \(0, 1\]"):
        compose_settings(decode={"top_p": 2.0})
    with pytest.raises(ValueError, match="mode=sparse_attn is an evaluation mode"):
        compose_settings(mode="sparse_attn")
    # Inside a running Hydra app (its own config dir), composing leaves the app's Hydra state alone.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose_settings(sparsity={"attn_topk": 0.25}).sparsity.attn_topk == 0.25
        assert GlobalHydra.instance().is_initialized() and compose("evaluate").task_name == "evaluate"
