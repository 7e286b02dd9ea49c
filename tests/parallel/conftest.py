"""Eight fake CPU devices for the parallel tests.

XLA reads `--xla_force_host_platform_device_count` once, when jax first creates its CPU backend, so the flag is
set here before anything imports jax when only tests/parallel is selected. When another test directory imported
jax first with fewer devices, the `eight_devices` fixture re-runs the requesting tests in a fresh interpreter
that has the flag, and reports each one's outcome from there: a pass there is a pass here, a failure a failure.
The re-run is one subprocess per test *module* (every selected test of the module that asks for
`eight_devices`), so the interpreter start, the imports and the module's cached models and compiled steps are
paid for once, not once per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

N_DEVICES = 8
# The programs here are tiny and compiled for many meshes: LLVM's expensive passes would triple the suite's time
# for no measurable gain. Both sides of every comparison run in the same process, under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FLAG = f"--xla_force_host_platform_device_count={N_DEVICES} {FAST_COMPILE}"



def _only_parallel_tests_selected() -> bool:
    """Whether the command line names only paths under tests/parallel: then the whole process may have 8
    devices. Otherwise other tests, written for one device (default meshes span every device), run here too."""
    here = Path(__file__).resolve().parent
    paths = [a.split("::")[0] for a in sys.argv[1:] if not a.startswith("-")]
    paths = [Path(a).resolve() for a in paths if Path(a).exists()]
    return bool(paths) and all(p == here or here in p.parents for p in paths)


if (
    "jax" not in sys.modules
    and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    and _only_parallel_tests_selected()
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

RERUN_MARK = "JAXTUNE_PARALLEL_RERUN"
RESULTS = "JAXTUNE_PARALLEL_RESULTS"  # in the re-run: a JSON-lines file each test's outcome is appended to


def pytest_runtest_logreport(report):
    """In the re-run subprocess: record every phase's outcome (and the test's stdout) for the parent."""
    path = os.environ.get(RESULTS)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    reason = ""
    if report.longrepr:
        reason = (
            report.longrepr[2]
            if report.skipped and isinstance(report.longrepr, tuple)
            else str(report.longrepr)
        )
    row = {
        "nodeid": report.nodeid,
        "outcome": report.outcome,
        "text": reason[-6000:],
        "stdout": report.capstdout,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def _module_rerun(request):
    """Run this module's selected `eight_devices` tests in one subprocess with 8 devices: {nodeid: [rows]}."""
    nodeids = [
        item.nodeid
        for item in request.session.items
        if getattr(item, "module", None) is request.module and "eight_devices" in item.fixturenames
    ]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {
            **os.environ,
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(),
            RERUN_MARK: "1",
            RESULTS: str(results),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
            cwd=Path(request.config.rootpath),
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        rows: dict[str, list[dict]] = {}
        if results.exists():
            for line in results.read_text().splitlines():
                row = json.loads(line)
                rows.setdefault(row["nodeid"], []).append(row)
    return rows, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture
def eight_devices(request):
    """The first 8 devices; in a process that has fewer, the test is proven in a subprocess instead."""
    if jax.device_count() >= N_DEVICES:
        return jax.devices()[:N_DEVICES]
    if os.environ.get(RERUN_MARK):
        pytest.fail(
            f"subprocess still has {jax.device_count()} devices; XLA_FLAGS={os.environ.get('XLA_FLAGS')}"
        )
    rows, tail = request.getfixturevalue("_module_rerun")
    mine = rows.get(request.node.nodeid)
    if not mine:
        pytest.fail(f"{request.node.nodeid} did not report from the {N_DEVICES}-device subprocess:\n{tail}")
    for row in mine:
        if row["outcome"] == "failed":
            pytest.fail(
                f"failed with {N_DEVICES} fake devices in a subprocess:\n{row['stdout']}{row['text']}"
            )
    for row in mine:
        if row["outcome"] == "skipped":
            pytest.skip(f"skipped in the {N_DEVICES}-device subprocess: {row['text']}")
    printed = "".join(row["stdout"] for row in mine).strip()
    if printed:
        print(f"[{N_DEVICES}-device subprocess]\n{printed}")  # shown with -s / -rP, like the test's own output
    request.node.proven_in_subprocess = True  # pytest_pyfunc_call below: the body already ran there, and passed
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test the `eight_devices` fixture proved in the 8-device subprocess passes here without re-running its
    body (which would need the 8 devices this process lacks)."""
    if getattr(pyfuncitem, "proven_in_subprocess", False):
        return True
    return None
