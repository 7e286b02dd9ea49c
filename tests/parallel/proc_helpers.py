"""Running several local jax processes in a test: collect every output, never hang CI on a lost peer."""

from __future__ import annotations

import subprocess


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's combined output, in order; all exited 0 (else the failing one's tail is shown)."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs
