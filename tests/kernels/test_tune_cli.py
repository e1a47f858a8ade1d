"""``python -m polar_sparsity.kernels.tune``: argument parsing, key enumeration, refusal without a GPU."""

import re
from pathlib import Path

import pytest
import torch

from polar_sparsity.kernels import tune
from polar_sparsity.kernels._decode_attention import config_key as attn_key
from polar_sparsity.kernels.selective_mlp_down import config_key as down_key
from polar_sparsity.kernels.selective_mlp_up import config_key as up_key

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = ["--hidden", "4096", "--heads", "32", "--kv-heads", "8", "--ffn", "14336", "--mlp", "gated"]


def test_dry_run_lists_every_key(capsys):
    tune.main(
        [*LLAMA3_8B, "--batch", "16", "64", "--context", "4096", "--density", "0.25", "1.0", "--dry-run"]
    )
    out = capsys.readouterr().out
    k = round(0.25 * 14336)
    for key in (
        up_key(16, k, 4096, True),
        down_key(64, 14336, 4096),
        attn_key(128, 4, 16 * 2, 4096),  # 2 of 8 groups per sequence
        attn_key(128, 4, 64 * 8, 4096),  # dense: every group
    ):
        assert key in out.splitlines()


def test_model_yaml_and_hf_config_give_the_shapes():
    opt = tune.shapes_from_config(ROOT / "conf/model/opt-66b.yaml")
    assert opt == tune.Shapes(hidden=9216, heads=72, kv_heads=72, head_dim=128, ffn=36864, gated=False)
    llama = tune.shapes_from_config(ROOT / "conf/model/llama-3.1-70b.yaml")
    assert llama.group == 8 and llama.gated
    tiny = tune.shapes_from_config(ROOT / "polar_sparsity/assets/models/tiny-llama/config.json")
    assert tiny.gated and tiny.heads % tiny.kv_heads == 0


def test_model_config_dry_run(capsys):
    tune.main(["--model-config", str(ROOT / "conf/model/opt-66b.yaml"), "--batch", "64", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Shapes(hidden=9216")
    assert any(line.startswith("attn|D128|G1|") for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "4096", "--heads", "32"], "missing --ffn, --mlp"),
        ([*LLAMA3_8B, "--model-config", "x.yaml"], "either --model-config"),
        ([*LLAMA3_8B, "--density", "0", "0.5"], "in \\(0, 1\\]"),
        ([*LLAMA3_8B, "--batch", "0"], "--batch values must be >= 1"),
        (["--hidden", "4096", "--heads", "30", "--kv-heads", "8", "--ffn", "1", "--mlp", "relu"], "multiple"),
        (["--model-config", "no/such.yaml"], "does not exist"),
    ],
)
def test_bad_arguments_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tune.main([*argv, "--dry-run"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_gpu_it_refuses_and_points_at_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        tune.main([*LLAMA3_8B, "--batch", "1"])
