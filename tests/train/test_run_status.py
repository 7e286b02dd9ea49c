"""status.json, written by the run itself (train/status.py): "running" while it trains (its pid, host, start step
and total), then "finished" / "stopped" (a signal, resumable) / "failed" (any exception: the error's first line,
and the error still propagates); `read_status` reads a running status whose process is gone as "died", and a
missing or garbage file as None; only process 0 writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from train.test_loop import tiny
from train.test_resume import in_step

from jaxtune import cli
from jaxtune.config import load_config
from jaxtune.errors import NonFiniteLoss
from jaxtune.train import loop
from jaxtune.train.status import RunStatus, begin, is_alive, read_status, write_status


def raw_status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def test_finished_then_stopped_by_sigterm_then_resumed_to_finished(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, max_steps=3, export_hf=False)
    run_dir = tmp_path / "run"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    seen = {}

    def term(run):
        seen.update(raw_status(run.run_dir))  # what a reader sees mid-run
        seen["read"] = read_status(run.run_dir)["state"]
        os.kill(os.getpid(), signal.SIGTERM)

    t0 = time.time()
    in_step(monkeypatch, 2, term)
    assert cli.main(["train", str(path)]) == 143
    assert seen["state"] == "running" and seen["read"] == "running"  # our own pid: alive
    assert (seen["pid"], seen["host"], seen["step"], seen["total_steps"]) == (os.getpid(), socket.gethostname(), 0, 3)
    assert t0 <= seen["started"] <= time.time()
    stopped = raw_status(run_dir)
    assert stopped["state"] == "stopped" and stopped["stop_reason"] == "signal SIGTERM"
    assert stopped["step"] == 2 and stopped["started"] == seen["started"] and stopped["ended"] >= stopped["started"]
    assert "error" not in stopped and not list(run_dir.glob(".status.json*"))  # no temporary file left

    in_step(monkeypatch, 1, lambda run: seen.update(resumed=raw_status(run.run_dir)))
    assert cli.main(["train", str(path)]) == 0  # resumes from checkpoint 2
    assert seen["resumed"]["state"] == "running" and seen["resumed"]["step"] == 2
    done = read_status(run_dir)
    assert done["state"] == "finished" and done["stop_reason"] == "completed"
    assert (done["step"], done["total_steps"]) == (3, 3)


def test_sigterm_while_the_run_is_built_stops_it_resumably(tmp_path, monkeypatch, capsys):
    """A SIGTERM before the loop installs its handler (weights, data, compilation: minutes on a big model) is
    a stop like one between steps: status "stopped", exit 143, one line, and the rerun trains from the start."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny(tmp_path, max_steps=2, export_hf=False)))
    build = loop.build_run

    def building(cfg):
        monkeypatch.setattr(loop, "build_run", build)
        run = build(cfg)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` arrives while the run is set up
        return run

    monkeypatch.setattr(loop, "build_run", building)
    assert cli.main(["train", str(path)]) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is not left behind
    err = capsys.readouterr().err
    assert "stopped by SIGTERM outside the training steps" in err and "Traceback" not in err
    status = read_status(tmp_path / "run")
    assert status["state"] == "stopped" and status["stop_reason"] == "signal SIGTERM" and "error" not in status
    assert cli.main(["train", str(path)]) == 0
    assert read_status(tmp_path / "run")["state"] == "finished"


def test_a_bad_data_file_after_setup_writes_failed_and_the_error_still_reaches_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"oops": 1}')  # not JSON: cut short
    cfg = tiny(tmp_path, max_steps=2)
    cfg["data"]["train"] = [str(bad)]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["stop_reason"] is None and status["pid"] == os.getpid()
    assert err.startswith("jaxtune: error: ") and err.removeprefix("jaxtune: error: ").startswith(status["error"])
    assert "bad.json" in status["error"] and "\n" not in status["error"] and status["user_error"] is True


def test_nan_and_keyboard_interrupt_write_failed(tmp_path, monkeypatch):
    cfg = tiny(tmp_path / "nan", max_steps=20, learning_rate=1e9, max_grad_norm=0.0)
    with pytest.raises(NonFiniteLoss):
        loop.run(load_config(cfg))
    status = read_status(tmp_path / "nan" / "run")
    assert status["state"] == "failed" and status["error"].startswith("non-finite loss at step")
    assert (status["error_type"], status["user_error"]) == ("NonFiniteLoss", True)

    def interrupt(run):
        raise KeyboardInterrupt

    in_step(monkeypatch, 1, interrupt)
    path = tmp_path / "ki.json"
    path.write_text(json.dumps(tiny(tmp_path / "ki", max_steps=2)))
    assert cli.main(["train", str(path)]) == 130
    status = read_status(tmp_path / "ki" / "run")
    assert status["state"] == "failed" and status["error"] == "KeyboardInterrupt" and status["step"] == 0
    assert (status["error_type"], status["user_error"]) == ("KeyboardInterrupt", False)


def test_read_status_died_garbage_other_host_and_only_process_0_writes(tmp_path):
    assert read_status(tmp_path) is None  # missing
    (tmp_path / "status.json").write_text('{"state": "runn')  # torn
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text("[1, 2]")
    assert read_status(tmp_path) is None

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    status = {"state": "running", "pid": gone.pid, "host": socket.gethostname(), "started": time.time() - 5}
    write_status(tmp_path, status)
    assert not is_alive(status) and read_status(tmp_path)["state"] == "died"

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not yet reaped: still not alive
    deadline = time.time() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z" and time.time() < deadline:
        time.sleep(0.01)
    assert not is_alive({**status, "pid": zombie.pid})
    zombie.wait()

    mine = begin(tmp_path, step=0, total_steps=5)
    assert is_alive(mine) and read_status(tmp_path) == mine
    assert not is_alive({**mine, "started": time.time() - 3600})  # its pid since reused by a later process
    write_status(tmp_path, {**mine, "host": "elsewhere"})  # can't check another host's pid: left as written
    assert read_status(tmp_path)["state"] == "running" and not is_alive(read_status(tmp_path))

    other = tmp_path / "other"
    other.mkdir()
    cfg = SimpleNamespace(output_dir=str(other))
    with pytest.raises(RuntimeError), RunStatus(cfg) as status:  # process 1 of several: never writes
        status.built(SimpleNamespace(main=False, run_dir=other, resumed=None, steps=5))
        raise RuntimeError("boom")
    assert not (other / "status.json").exists()
    write_status(other, {**mine, "pid": mine["pid"] + 1})  # another process's status: left alone
    with pytest.raises(ValueError), RunStatus(cfg):
        raise ValueError("before setup")
    assert read_status(other)["pid"] == mine["pid"] + 1 and "error" not in read_status(other)
