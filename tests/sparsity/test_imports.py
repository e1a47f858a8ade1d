"""The GPU paths (masking, selection, calibration table, perplexity) import neither Hydra, OmegaConf,
W&B nor lm-eval."""

from __future__ import annotations

import subprocess
import sys


def test_gpu_path_imports_stay_light() -> None:
    code = (
        "import sys\n"
        "import polar_sparsity.sparsity.masking, polar_sparsity.sparsity.selection\n"
        "import polar_sparsity.sparsity.calibration\n"
        "import polar_sparsity.evaluation.perplexity\n"
        "heavy = [m for m in ('hydra', 'omegaconf', 'wandb', 'lm_eval', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
