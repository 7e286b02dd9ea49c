"""Suite-wide:
- XLA's persistent compilation cache, shared by the test process and every run it starts in a subprocess: the
  suite compiles the same tiny programs many times (each resume, export and CLI run is a fresh process), and
  a cache hit is an exact copy of what the compiler returns, keyed by the program, jax version and devices.
  `JAX_COMPILATION_CACHE_DIR` set beforehand picks the directory; `JAXTUNE_TEST_XLA_CACHE=0` turns it off.
- the tokenised-dataset cache (`data.cache`) of every run in the suite, subprocesses included, lives in a fresh
  temporary directory (`JAXTUNE_DATA_CACHE`), never in the home directory; removed at exit.
- XLA compiles with LLVM's expensive passes off (`FAST_COMPILE`), here and in every run the suite starts in a
  subprocess: the suite's programs are tiny and compiled once or twice each, so compilation is most of its
  time, and those passes cost about 30% of the suite's CPU for no measurable gain in running them. Both sides
  of every comparison run under the same flags (transformers' logits come from torch, untouched).
  `JAXTUNE_TEST_FAST_COMPILE=0` compiles as a user's run does.
- pytest-xdist (`-n auto` in pyproject's addopts, whole test files per worker) runs one worker per core, at most
  `MAX_WORKERS`: each worker is a full interpreter with JAX, torch and transformers, so more would only use memory.
- a training run points the `jaxtune` logger at its run directory and stops it propagating (no duplicate lines
  under a configured root logger); undo that after each test so `caplog` sees jaxtune's records whatever ran
  before.
"""

import atexit
import logging
import os
import shutil
import sys
import tempfile

import pytest

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MAX_WORKERS = 4

if os.environ.get("JAXTUNE_TEST_FAST_COMPILE", "1") != "0" and "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may use, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


os.environ["JAXTUNE_DATA_CACHE"] = tempfile.mkdtemp(prefix="jaxtune-test-data-cache-")
atexit.register(shutil.rmtree, os.environ["JAXTUNE_DATA_CACHE"], True)

if os.environ.get("JAXTUNE_TEST_XLA_CACHE", "1") != "0":
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxtune-test-xla-cache")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:  # jax reads these once, when imported; not importing it here keeps
        import jax  # tests/parallel's conftest free to give a parallel-only session 8 devices

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _jaxtune_logger_propagates():
    yield
    logger = logging.getLogger("jaxtune")
    for handler in [h for h in logger.handlers if getattr(h, "_jaxtune", False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
