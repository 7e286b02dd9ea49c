"""`<output_dir>/status.json`: what a run is doing, written by the run itself, so a reader (the board's runs
table, a script, a person) tells running / finished / stopped / failed apart for a run started from anywhere.

    {"state": "running", "pid": 4242, "host": "node1", "started": 1718000000.0, "step": 0, "total_steps": 400}
    {"state": "finished", "stop_reason": "completed", "step": 400, "total_steps": 400, "ended": ..., pid, host,
     started}                                        # stop_reason completed / early_stopping
    {"state": "stopped", "stop_reason": "signal SIGTERM", ...}   # checkpointed: rerun the same command to resume
    {"state": "failed", "stop_reason": null, "error": "the first line of the error", "error_type": "DataError",
     "user_error": true, ...}                        # user_error: a JaxtuneError (`jaxtune train` exits 2)

Process 0 writes it, each time whole (a temporary file, then `os.replace`: a reader never sees half of one):
"running" as soon as the run directory exists (`setup.start_run`; step and total_steps null), again once the run
is built (its start step, the resumed checkpoint's, and its total), and the end state when the loop returns
(`RunStatus.end`) or raises (`RunStatus.__exit__`: any exception, KeyboardInterrupt and NonFiniteLoss included,
writes "failed" and propagates). `read_status` reads a "running" status whose process is gone (kill -9, the OOM
killer) as "died"; a SIGTERM outside the loop's own handling (set-up, compilation, export) is "stopped".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

STATUS_FILE = "status.json"
FINISHED_REASONS = ("completed", "early_stopping")


def write_status(run_dir, status: dict) -> None:
    """`status` as `run_dir/status.json`, atomically (a temporary file beside it, renamed over it)."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, path)


def begin(run_dir, step: int | None = None, total_steps: int | None = None) -> dict:
    """Process 0 of a starting run: "running", this process's pid and host."""
    status = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "step": step, "total_steps": total_steps}  # fmt: skip
    write_status(run_dir, status)
    return status


def read_status(run_dir) -> dict | None:
    """`run_dir/status.json` as a dict (None: missing or unreadable); "running" with its process gone -> "died"."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        return None
    if status["state"] == "running" and status.get("host") == socket.gethostname() and not is_alive(status):
        status = {**status, "state": "died"}
    return status


def is_alive(status: dict | None) -> bool:
    """Whether the process a status names is alive: on this host, its pid exists, is no zombie and was not
    reused by a process started after the status was written. A status from another host: False (unknown)."""
    if not status or status.get("host") != socket.gethostname():
        return False
    pid = status.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    except OSError:
        return False
    proc = _proc_stat(pid)
    if proc is None:  # no /proc (not Linux): os.kill's answer
        return True
    state, started = proc
    if state == "Z":
        return False
    run_started = status.get("started")
    return not (started is not None and isinstance(run_started, (int, float)) and started > run_started + 2.0)


def _proc_stat(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time in unix seconds or None) of a process from /proc; None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))  # fmt: skip
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        started = None
    return fields[0], started


def _error_fields(e: BaseException) -> dict:
    """error: the first line of its text (a jaxtune error's as the CLI prints it, others after their class
    name); error_type: the class name; user_error: a `JaxtuneError` (the CLI's one-line error, exit status 2)."""
    from jaxtune.errors import JaxtuneError

    lines = str(e).strip().splitlines()
    text, user = (lines[0] if lines else ""), isinstance(e, JaxtuneError)
    error = text if user and text else f"{type(e).__name__}: {text}" if text else type(e).__name__
    return {"error": error, "error_type": type(e).__name__, "user_error": user}


class Preempted(BaseException):
    """SIGTERM outside the training loop's own handling (`lifecycle.Signals`): while the run is set up, loads
    weights and data or compiles, or after the loop (generation eval, export). A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


def _preempted(signum, frame):
    raise Preempted(signal.Signals(signum).name)


class RunStatus:
    """Around building and training one run (loop.run, rl_loop.run):

        with RunStatus(cfg) as status:
            run = status.built(build_run(cfg))      # "running" again, with the start step and total_steps
            return status.end(train(run))           # "finished" / "stopped" from the summary's stop_reason

    Any exception leaving the block writes "failed" (with the error's first line) and propagates; a SIGTERM
    outside the loop's own handling (`Preempted`) writes "stopped" and leaves the block, `summary` set. Only the
    process that wrote "running" (process 0, in `setup.start_run`) writes: one that failed before the run
    directory was set up (a config the mesh refuses) leaves an older status as it was."""

    def __init__(self, cfg):
        self.run_dir = Path(cfg.output_dir)
        self.status: dict | None = None  # what this process wrote; None: not process 0, or not started
        self.summary: dict | None = None  # set when a SIGTERM outside the loop stopped the run (see __exit__)
        self._previous = None

    def __enter__(self) -> RunStatus:
        # SIGTERM before the loop takes it over (or after it) stops the run as the loop's handler would: status
        # "stopped", `jaxtune train` exits 143, rerunning resumes; instead of dying with no status (-15)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _preempted)
        return self

    def _ours(self) -> dict | None:
        """The status this process wrote in setup.start_run (same pid and host), or None."""
        status = read_status(self.run_dir)
        if status and status.get("pid") == os.getpid() and status.get("host") == socket.gethostname():
            return status
        return None

    def built(self, run):
        if run.main:
            mine = self._ours() or begin(run.run_dir)
            self.status = {**mine, "state": "running", "step": int(run.resumed or 0), "total_steps": int(run.steps)}
            write_status(self.run_dir, self.status)
        return run

    def _end(self, state: str, **fields) -> None:
        status = self.status if self.status is not None else self._ours()
        if status is None:
            return
        self.status = {**status, "state": state, **fields, "ended": round(time.time(), 3)}
        write_status(self.run_dir, self.status)

    def end(self, summary: dict) -> dict:
        reason = str(summary.get("stop_reason", ""))
        state = "finished" if reason in FINISHED_REASONS else "stopped" if reason.startswith("signal") else "failed"
        step = summary.get("step", (self.status or {}).get("step"))
        best = {k: summary[k] for k in ("best_step", "best_metric", "best_value") if summary.get(k) is not None}
        self._end(state, stop_reason=reason, step=step, **best)  # best_*: which checkpoint to export / compare
        return summary

    def __exit__(self, kind, error, tb) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if isinstance(error, Preempted):
            reason = f"signal {error.args[0] if error.args else 'SIGTERM'}"
            step = (self.status or {}).get("step")
            self._end("stopped", stop_reason=reason, step=step)
            self.summary = {"run_dir": str(self.run_dir), "stop_reason": reason, "step": step}
            print(f"jaxtune: stopped by {reason.removeprefix('signal ')} outside the training steps; nothing "
                  "since the last checkpoint was lost. Rerun the same command to resume.", file=sys.stderr)
            return True  # the caller returns `summary`: `jaxtune train` exits 128 + the signal's number
        if error is not None and not (self.status or {}).get("ended"):
            self._end("failed", stop_reason=None, **_error_fields(error))
        return False
