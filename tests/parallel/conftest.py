"""Eight fake CPU devices for the parallel tests.

XLA reads `--xla_force_host_platform_device_count` once, when jax first creates its CPU backend, so the flag is
set here before anything imports jax (running `pytest tests/parallel`). When another test directory imported
jax first with fewer devices, the `eight_devices` fixture re-runs the requesting test in a fresh interpreter
that has the flag, and reports the outcome from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

N_DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={N_DEVICES}"

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

RERUN_MARK = "JAXTUNE_PARALLEL_RERUN"


@pytest.fixture
def eight_devices(request):
    """The first 8 devices; in a process that has fewer, the test is proven in a subprocess instead."""
    if jax.device_count() >= N_DEVICES:
        return jax.devices()[:N_DEVICES]
    if os.environ.get(RERUN_MARK):
        pytest.fail(
            f"subprocess still has {jax.device_count()} devices; XLA_FLAGS={os.environ.get('XLA_FLAGS')}"
        )
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(), RERUN_MARK: "1"}
    root = Path(request.config.rootpath)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"failed with {N_DEVICES} fake devices in a subprocess:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
        )
    pytest.skip(
        f"passed in a subprocess with {N_DEVICES} fake CPU devices (this process has {jax.device_count()})"
    )
