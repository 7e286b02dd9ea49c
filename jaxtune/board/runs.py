"""The board's backend for runs: list the run directories under a root, read their curves, and launch, stop,
resume and export runs as `jaxtune` subprocesses. No web code here, and neither gradio nor jax is imported.

    rows = scan("runs")                          # RunRow per run directory, newest first
    curves([a, b], "loss", "train")              # {run name: [(step, value), ...]} to overlay
    metric_names([a, b]), latest(a)              # what can be plotted; the last train / eval records
    launcher = Launcher()
    launcher.start("configs/demo.yaml", "runs/demo", ["training.max_steps=50"])   # -> pid
    launcher.stop("runs/demo")                   # SIGTERM: the run checkpoints and exits 143
    launcher.resume("runs/demo")                 # the same command again; jaxtune resumes by itself
    launcher.poll("runs/demo"), launcher.wait("runs/demo", 60), launcher.log_tail("runs/demo")
    export("runs/demo", "merge")                 # `jaxtune export` -> (returncode, output, out_dir)

What a run directory holds and who writes it: config.yaml, run_info.json, train.log, metrics.jsonl, status.json
(the run itself: jaxtune/train/status.py), checkpoints/, the exports (hf/, adapter/ ...); board.json (the command
a board started it with, its pid, host and cwd) and board.log (its stdout and stderr) come from `Launcher`.
A run outlives the board: it runs in a session of its own, so closing the page or restarting the server never
stops it, and a later board finds it again through board.json / status.json. The files are read tolerantly
(board/records.py): a run may be writing them, an older jaxtune may have.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune.board.records import METRICS_FILE, best_of, describe, number, read_json, read_metrics, run_config
from jaxtune.errors import MissingError, RunError
from jaxtune.train.status import STATUS_FILE, is_alive, read_status

BOARD_FILE = "board.json"
BOARD_LOG = "board.log"
NOT_METRICS = ("step", "split", "time")
EXPORT_MARKERS = ("config.json", "adapter_config.json")  # a directory holding one is an export
DEFAULT_EXPORT = {"auto": "export", "adapter": "adapter_export", "merge": "merged"}


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class RunRow:
    path: str  # the run directory
    name: str  # run_name, else the path below the scanned root
    stage: str = ""
    method: str = ""  # e.g. "lora" or "lora+prefix"
    model: str = ""  # model.path, or "random <model_type>"
    steps: str = ""  # "12/400"
    step: int = 0
    total_steps: int | None = None
    best: str = ""  # "eval_loss 1.234 @ 200"
    status: str = "new"  # running | finished | stopped | failed: <error> | died | new
    updated: float = 0.0  # newest mtime of the run's files
    exports: list[str] = field(default_factory=list)  # exported directories in it: hf, adapter, merged ...


def _status_text(run_dir: Path) -> tuple[str, dict | None]:
    status = read_status(run_dir)
    board = read_json(run_dir / BOARD_FILE)
    if board and is_alive(board):  # launched by a board; a status older than that launch is a previous attempt's
        if status is None or (number(status.get("started")) or 0) < (number(board.get("started")) or 0):
            return "running", status
    if status is None:
        return "new", None
    if status["state"] == "failed":
        return f"failed: {status.get('error') or '?'}", status
    return status["state"], status


def _exports(run_dir: Path) -> list[str]:
    try:
        children = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name != "checkpoints")
    except OSError:
        return []
    return [p.name for p in children if any((p / marker).is_file() for marker in EXPORT_MARKERS)]


def _updated(run_dir: Path) -> float:
    names = ("config.yaml", STATUS_FILE, METRICS_FILE, "train.log", BOARD_LOG, BOARD_FILE, "checkpoints")
    times = [0.0]
    for name in (".", *names):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times)


def _count(value) -> int | None:
    """A positive int read from a file, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def run_row(run_dir, name: str | None = None) -> RunRow:
    """One row of the runs table for `run_dir` (whatever of it is readable)."""
    run_dir = Path(run_dir)
    info = describe(*run_config(run_dir))
    records = read_metrics(run_dir)
    text, status = _status_text(run_dir)
    steps = [r["step"] for r in records if r.get("split") == "train"]
    step = max([*steps, _count((status or {}).get("step")) or 0])
    total = _count((status or {}).get("total_steps")) or _count(info["max_steps"])
    best = best_of(records, info["best_metric"] or "eval_loss", info["best_mode"] or "min")
    return RunRow(
        path=str(run_dir), name=str(info["run_name"] or name or run_dir.name), stage=info["stage"],
        method=info["method"], model=info["model"], steps=f"{step}/{total}" if total else str(step), step=step,
        total_steps=total, best=f"{info['best_metric']} {best[0]:.4g} @ {best[1]}" if best else "", status=text,
        updated=_updated(run_dir), exports=_exports(run_dir),
    )  # fmt: skip


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / STATUS_FILE).is_file()


def find_runs(runs_root, depth: int = 2) -> list[Path]:
    """Run directories at `runs_root` or up to `depth` levels below it (not inside another run's)."""
    root, found = Path(runs_root), []

    def visit(path: Path, level: int) -> None:
        if is_run_dir(path):
            found.append(path)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            visit(child, level + 1)

    if root.is_dir():
        visit(root, 0)
    return found


def scan(runs_root) -> list[RunRow]:
    """A RunRow for every run directory under `runs_root` (two levels deep), newest first."""
    root = Path(runs_root)
    rows = [run_row(p, "/".join(p.relative_to(root).parts) or p.name) for p in find_runs(root)]
    return sorted(rows, key=lambda r: r.updated, reverse=True)


def _names(run_dirs) -> list[tuple[str, Path]]:
    """(a distinct name, path) per run: its run_name or directory name, the whole path where two agree."""
    paths = [Path(p) for p in run_dirs]
    names = []
    for p in paths:
        _, raw = run_config(p)
        names.append(str(raw.get("run_name") or p.name))
    return [(n if names.count(n) == 1 else str(p), p) for n, p in zip(names, paths)]


def curves(run_dirs, metric: str = "loss", split: str = "train") -> dict[str, list[tuple[int, float]]]:
    """{run name: [(step, value), ...]} of `metric` in the `split` records of each run, by step (a step logged
    twice keeps its last value; non-finite values are left out)."""
    out = {}
    for name, path in _names(run_dirs):
        points = {}
        for r in read_metrics(path):
            value = number(r.get(metric)) if r.get("split") == split else None
            if value is not None:
                points[r["step"]] = value
        out[name] = sorted(points.items())
    return out


def metric_names(run_dirs) -> list[tuple[str, str]]:
    """Every (split, metric) some record of these runs holds: train first, then eval, then the rest."""
    seen = set()
    for path in run_dirs:
        for r in read_metrics(path):
            seen.update((str(r.get("split")), k) for k, v in r.items() if k not in NOT_METRICS and number(v) is not None)
    order = {"train": 0, "eval": 1}
    return sorted(seen, key=lambda sk: (order.get(sk[0], 2), sk[0], sk[1] != "loss", sk[1]))


def latest(run_dir) -> dict:
    """The last train record's step, loss, lr and throughput (tokens_per_s: its own key, else tokens over
    step_time_s), with the whole record under "train" and the last eval record under "eval"."""
    records = read_metrics(run_dir)
    train = next((r for r in reversed(records) if r.get("split") == "train"), None)
    evaluated = next((r for r in reversed(records) if r.get("split") == "eval"), None)
    out = {"step": None, "loss": None, "lr": None, "tokens_per_s": None, "train": train, "eval": evaluated}
    if train:
        out.update(step=train["step"], loss=number(train.get("loss")), lr=number(train.get("lr")))
        rate = next((number(v) for k, v in train.items() if k.endswith("per_s")), None)
        tokens, seconds = number(train.get("tokens")), number(train.get("step_time_s"))
        out["tokens_per_s"] = rate if rate is not None else tokens / seconds if tokens and seconds else None
    return out


# ----------------------------------------------------------------------------------------------- processes


def child_env(env: dict | None = None) -> dict:
    """os.environ + `env`, with the directory holding this jaxtune first on PYTHONPATH (a source checkout runs
    itself, not an installed copy) and unbuffered output (board.log fills as the run prints)."""
    out = {**os.environ, **(env or {})}
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p != root)])
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


def _origin_cwd(run_dir: Path, output_dir) -> Path | None:
    """The directory a CLI run was started from: where its relative `output_dir` leads to `run_dir`."""
    rel = Path(str(output_dir)) if output_dir else None
    if rel is None or rel.is_absolute():
        return None
    parts, tail = run_dir.resolve().parts, rel.parts
    if len(parts) > len(tail) and parts[-len(tail) :] == tail:
        return Path(*parts[: -len(tail)])
    return None


def run_cwd(run_dir) -> Path | None:
    """The working directory a run's relative paths (model.path, data files) are relative to: the one a board
    started it in, else the one a relative output_dir implies; None: unknown (absolute output_dir)."""
    run_dir = Path(run_dir)
    board = read_json(run_dir / BOARD_FILE)
    if board and board.get("cwd"):
        return Path(board["cwd"])
    return _origin_cwd(run_dir, run_config(run_dir)[1].get("output_dir"))


class Launcher:
    """Starts `jaxtune train` runs as subprocesses and stops, resumes, polls and waits for them, by run directory.

    A run it starts runs in a session of its own (`start_new_session`): signals to the board's process group
    (Ctrl-C of the server, a closed terminal) never reach it. Runs this instance did not start (another board, the
    CLI) are found through board.json and status.json; their exit code is read from status.json."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    @staticmethod
    def _key(output_dir) -> str:
        return str(Path(output_dir).absolute())

    def live_pid(self, output_dir) -> int | None:
        """The pid of a live process of this run (started here, by another board, or from the CLI), or None."""
        run_dir = Path(output_dir)
        proc = self.procs.get(self._key(run_dir))
        if proc is not None and proc.poll() is None:
            return proc.pid
        board, status = read_json(run_dir / BOARD_FILE), read_status(run_dir)
        for record in (board, status if status and status["state"] == "running" else None):
            if record and is_alive(record):
                return int(record["pid"])
        return None

    def _refuse_live(self, run_dir: Path) -> None:
        pid = self.live_pid(run_dir)
        if pid is not None:
            raise RunError(f"{run_dir} is in use by a live run (pid {pid}): stop it first, or pick another output_dir")
        status = read_status(run_dir)
        if status and status["state"] == "running":  # on another host: its pid cannot be checked from here
            raise RunError(f"{run_dir}: status.json says a run is going on host {status.get('host')} "
                           f"(pid {status.get('pid')}); stop it there first")  # fmt: skip

    def _spawn(self, run_dir: Path, cmd: list[str], config: str, cwd, env) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        cwd = Path(cwd).absolute() if cwd is not None else Path.cwd()
        with open(run_dir / BOARD_LOG, "ab") as log:
            log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} (cwd {cwd}) {shlex.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            except OSError as e:  # no such cwd, interpreter gone
                raise RunError(f"cannot start {shlex.join(cmd[:4])} in {cwd}: {e}") from None
        self.procs[self._key(run_dir)] = proc
        record = {"pid": proc.pid, "host": socket.gethostname(), "cmd": cmd, "config": config, "cwd": str(cwd),
                  "started": round(time.time(), 3)}  # fmt: skip
        tmp = run_dir / f".{BOARD_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, run_dir / BOARD_FILE)
        return proc.pid

    def start(self, config_path, output_dir, overrides=(), cwd=None, env=None) -> int:
        """`python -m jaxtune train CONFIG *overrides output_dir=OUTPUT_DIR` in `cwd` (default: the current
        directory; a relative output_dir is relative to it), stdout and stderr appended to
        OUTPUT_DIR/board.log; `env`: variables added to this process's environment. -> the pid. RunError when
        a live process already uses the run directory."""
        base = Path(cwd).absolute() if cwd is not None else Path.cwd()
        run_dir = Path(output_dir) if Path(output_dir).is_absolute() else base / output_dir
        self._refuse_live(run_dir)
        kept = [str(o) for o in overrides if not str(o).startswith("output_dir=")]
        cmd = [sys.executable, "-m", "jaxtune", "train", str(config_path), *kept, f"output_dir={run_dir}"]
        return self._spawn(run_dir, cmd, str(config_path), base, env)

    def resume(self, output_dir, env=None) -> int:
        """Run the run's command again (board.json's; for a run started from the CLI, `jaxtune train
        <output_dir>/config.yaml`): jaxtune resumes from the latest checkpoint by itself. -> the pid."""
        run_dir = Path(output_dir).absolute()
        status = read_status(run_dir)
        if status and status["state"] != "running" and self.live_pid(run_dir) is not None:
            self.wait(run_dir, timeout=EXIT_WAIT)  # it has saved its checkpoint and is exiting: let it
        self._refuse_live(run_dir)
        board = read_json(run_dir / BOARD_FILE)
        if board and isinstance(board.get("cmd"), list) and board["cmd"]:
            return self._spawn(run_dir, [str(c) for c in board["cmd"]], str(board.get("config", "")),
                               board.get("cwd"), env)  # fmt: skip
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise MissingError(f"{run_dir}: no board.json nor config.yaml, nothing to resume")
        cmd = [sys.executable, "-m", "jaxtune", "train", str(config), f"output_dir={run_dir}"]
        return self._spawn(run_dir, cmd, str(config), run_cwd(run_dir) or run_dir.parent, env)

    def stop(self, output_dir, force: bool = False) -> int:
        """SIGTERM to the run's process: it finishes its step, checkpoints and exits 143 (`resume` goes on from
        there). Returns at once, with the pid. `force`: SIGKILL (to its process group when it leads one); the
        steps since its last checkpoint are lost. RunError when no live process of this run is known."""
        pid = self.live_pid(output_dir)
        if pid is None:
            raise RunError(f"{output_dir}: no live run to stop")
        if force:
            try:
                group = os.getpgid(pid) == pid
            except OSError:
                group = False
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGTERM)
        return pid

    def poll(self, output_dir) -> int | None:
        """None while the run's process lives, else its exit code. A process this launcher started is reaped
        and its own code returned; for another one it is read from status.json: finished 0, stopped 128 + the
        signal's number, failed 130 (KeyboardInterrupt) / 2 (a jaxtune error) / 1, died or no status -1."""
        proc = self.procs.get(self._key(output_dir))
        if proc is not None:
            return proc.poll()
        if self.live_pid(output_dir) is not None:
            return None
        return exit_code(read_status(output_dir))

    def wait(self, output_dir, timeout: float | None = None) -> int | None:
        """The exit code once the run's process ends (None if it is still running after `timeout` seconds)."""
        proc = self.procs.get(self._key(output_dir))
        if proc is not None:
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll(output_dir)) is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        return code

    @staticmethod
    def log_tail(output_dir, n_bytes: int = 20000) -> str:
        """The end of the run's board.log (or train.log): the module's `log_tail`."""
        return log_tail(output_dir, n_bytes)


EXIT_WAIT = 60.0  # seconds `resume` waits for a run that wrote its final status to exit


def exit_code(status: dict | None) -> int:
    """The exit status `jaxtune train` ended with, as far as status.json tells it (see `Launcher.poll`)."""
    state = (status or {}).get("state")
    if state == "finished":
        return 0
    if state == "stopped":
        name = str(status.get("stop_reason", "")).removeprefix("signal ")
        return 128 + signal.Signals[name].value if name in signal.Signals.__members__ else 143
    if state == "failed":
        return 130 if status.get("error_type") == "KeyboardInterrupt" else 2 if status.get("user_error") else 1
    return -1


def log_tail(output_dir, n_bytes: int = 20000) -> str:
    """The last `n_bytes` of the run's board.log (train.log when a board did not start it), a cut first line
    dropped; a progress bar's carriage-return redraws shown as their last state."""
    run_dir = Path(output_dir)
    path = run_dir / BOARD_LOG if (run_dir / BOARD_LOG).is_file() else run_dir / "train.log"
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - n_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > n_bytes:
        text = text.partition("\n")[2]
    lines = []
    for line in text.split("\n"):
        shown = [part for part in line.split("\r") if part.strip()]
        lines.append(shown[-1] if shown else "")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- export


def export(run_dir, kind: str = "auto", out=None, timeout: float | None = None, env=None) -> tuple[int, str, Path]:
    """`python -m jaxtune export RUN_DIR OUT [--adapter | --merge]` -> (return code, its output, OUT).
    kind: auto (the natural form: an adapter for adapter methods, else an HF model), adapter, merge. OUT
    defaults to RUN_DIR/export, RUN_DIR/adapter_export or RUN_DIR/merged (never the run's own hf/ or adapter/)."""
    if kind not in DEFAULT_EXPORT:
        raise RunError(f"export kind must be one of {sorted(DEFAULT_EXPORT)}, got {kind!r}")
    run_dir = Path(run_dir).absolute()
    out_dir = Path(out).absolute() if out is not None else run_dir / DEFAULT_EXPORT[kind]
    flags = {"auto": [], "adapter": ["--adapter"], "merge": ["--merge"]}[kind]
    cmd = [sys.executable, "-m", "jaxtune", "export", str(run_dir), str(out_dir), *flags]
    try:
        done = subprocess.run(cmd, cwd=run_cwd(run_dir) or run_dir.parent, env=child_env(env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, text + f"\njaxtune board: export timed out after {timeout} s", out_dir
    return done.returncode, done.stdout + done.stderr, out_dir
