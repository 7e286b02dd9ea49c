"""bench/gpu_suite.sh --cpu-smoke: the real `jaxtune train` and transformers Trainer on the tiny preset, 3 steps.
Checks the printed lines' shape only: nothing is timed, no speed is asserted."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from train_bench import KEYS  # noqa: E402


def test_gpu_suite_cpu_smoke():
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "3"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-smoke"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [ln["side"] for ln in lines] == ["jaxtune", "torch"], proc.stdout
    for line in lines:
        assert set(line) == set(KEYS)
        assert line["skipped"] is None, line["skipped"]
        assert line["tokens_per_s"] > 0 and line["tokens_per_step"] == line["seq"] * line["batch"]
    assert math.isfinite(lines[0]["loss"])


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_suite_shellcheck():
    proc = subprocess.run(
        ["shellcheck", str(ROOT / "bench" / "gpu_suite.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout
