"""Test-wide settings: nothing reaches the network, nothing logs to W&B's servers, and without a GPU
Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before anything creates a ``@triton.jit`` function (the kernels, but
also libraries that import Triton), so it is set here, in the first module pytest loads.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
