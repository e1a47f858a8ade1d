"""The kernels' main loops compile to pipelined copies for Ampere and Hopper (no GPU needed).

Compiles through Triton's real code generator in a subprocess (the test session runs the CPU
interpreter, which would hide a synchronous load: it runs the same arithmetic either way).
"""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [80, 90])
def test_main_loops_wait_on_no_tile_load(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "polar_sparsity.kernels.bench.compiled", "--arch", str(arch), "--check"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| down M=64 | 0 |" in run.stdout, run.stdout
    # registers a thread and spilled bytes, read from the machine code: the down kernel spills nothing
    assert re.search(r"\| down M=64 \| 0 \| \d+ \| \d+ \| (yes|no) \| \d+ \| 0 \|", run.stdout), run.stdout


def test_an_unknown_architecture_is_named_before_compiling():
    cmd = [sys.executable, "-m", "polar_sparsity.kernels.bench.compiled", "--arch", "12"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "invalid choice: 12 (choose from 80, 86, 89, 90, 100, 120)" in run.stderr
