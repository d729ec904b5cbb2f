"""`benchmarks/gpu.py` works: on a machine without CUDA it says so and exits 0; `--cpu-smoke` runs every part
(the jobs on two devices and their agreement, extraction against the bare forward, training of every
architecture against the encoder GEMM) on the CPU at tiny sizes, so the script a GPU machine runs is tested
here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import benchmark_scripts

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would measure it")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    # in process: a second interpreter would only import torch again (the smoke test below runs the script itself)
    assert benchmark_scripts.load("gpu").main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_smoke_runs_every_part():
    out = run("--cpu-smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for part in ("1. agreement", "2. extraction", "3. training"):
        assert part in text, text
    for stage in ("extract:", "train:", "sweep:", "steer:"):
        line = next(line for line in text.splitlines() if line.strip().startswith(stage))
        assert "meets target" in line, line  # the same device twice here: any difference is a bug
    for arch in ("relu", "topk", "batchtopk", "jumprelu", "gated"):
        assert any(line.strip().startswith(arch) for line in text.splitlines()), arch
    assert "dictionaries per pass" in text and "bare forward" in text
