"""The board's runs backend (jaxtune/board/runs.py): the runs table read from fabricated run directories (torn
metrics lines, a config that no longer loads, status.json in each state, the best eval metric by min and max),
curves and metric names to overlay, the log tail; and one real `jaxtune train` the Launcher starts, stops
(SIGTERM: exit 143, "stopped"), resumes to the end ("finished") and exports as an HF model."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxtune import demo
from jaxtune.board import runs
from jaxtune.board.runs import Launcher, curves, export, latest, log_tail, metric_names, scan
from jaxtune.config import dump_yaml, load_config
from jaxtune.errors import RunError

REPO = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()


def config(out: Path, **training) -> dict:
    return {"stage": "sft", "output_dir": str(out), "model": {"random_init": {"model_type": "llama"}},
            "method": {"name": "lora", "combine": ["prefix"]}, "training": {"max_steps": 6, **training}}  # fmt: skip


def fabricate(run_dir: Path, cfg: dict | str | None, records: list, status: dict | None, mtime: float, tail: str = ""):
    run_dir.mkdir(parents=True)
    if isinstance(cfg, dict):
        dump_yaml(load_config(cfg), run_dir / "config.yaml")
    elif isinstance(cfg, str):
        (run_dir / "config.yaml").write_text(cfg)
    if records or tail:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))
    for p in [*run_dir.iterdir(), run_dir]:
        os.utime(p, (mtime, mtime))


def train(step, loss, **more):
    return {"step": step, "split": "train", "time": 1.0, "loss": loss, **more}


def evaluated(step, **values):
    return {"step": step, "split": "eval", "time": 1.0, **values}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    now = time.time()
    fabricate(root / "a", config(root / "a"),
              [train(1, 3.0, tokens=100.0, step_time_s=0.5, lr=1e-3), evaluated(2, loss=2.5), train(2, 2.0, tokens=100.0,
               step_time_s=0.25, lr=5e-4), evaluated(4, loss=1.25), evaluated(6, loss=1.5), train(6, float("nan"))],
              {"state": "finished", "stop_reason": "completed", "step": 6, "total_steps": 6, "pid": 1, "host": HOST},
              now - 30, tail='{"step": 7, "split": "tra')  # fmt: skip
    (root / "a" / "hf").mkdir()
    (root / "a" / "hf" / "config.json").write_text("{}")
    (root / "a" / "checkpoints" / "6").mkdir(parents=True)
    for p in (root / "a" / "hf", root / "a" / "checkpoints", root / "a"):
        os.utime(p, (now - 30, now - 30))
    fabricate(root / "group" / "b", config(root / "group" / "b", best_metric="eval_accuracy", best_mode="max"),
              [evaluated(2, accuracy=0.5, loss=1.0), evaluated(4, accuracy=0.75, loss=2.0), evaluated(6, accuracy=0.625)],
              {"state": "failed", "error": "data file x.json row 3: no field 'output'", "step": 0, "total_steps": 6,
               "pid": 2, "host": HOST}, now - 10)  # fmt: skip
    broken = "stage: sft\nrun_name: broken-one\nmethod:\n  name: dora\nmodel:\n  path: /models/m\ntraining:\n  max_steps: 9\n  warp: 1\n"
    fabricate(root / "c", broken, [train(3, 1.0)],
              {"state": "running", "pid": dead_pid(), "host": HOST, "started": now - 100, "step": 0, "total_steps": 9},
              now - 20)  # fmt: skip
    fabricate(root / "d", config(root / "d", max_steps=400), [], None, now - 40)
    fabricate(root / "e", ": not: [yaml", [], {"state": "stopped", "stop_reason": "signal SIGTERM", "step": 2}, now - 50)
    fabricate(root / "x" / "y" / "z", config(root / "z"), [], None, now)  # three levels down: not scanned
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    return root


def test_scan_lists_every_run_newest_first_with_status_steps_best_and_exports(root):
    rows = {r.name: r for r in scan(root)}
    assert [r.name for r in scan(root)] == ["group/b", "broken-one", "a", "d", "e"]
    a = rows["a"]
    assert (a.stage, a.method, a.model, a.status) == ("sft", "lora+prefix", "random llama", "finished")
    assert (a.steps, a.step, a.total_steps) == ("6/6", 6, 6) and a.exports == ["hf"] and a.path == str(root / "a")
    assert a.best == "eval_loss 1.25 @ 4"  # min; the torn last line and the NaN are skipped
    b = rows["group/b"]
    assert b.best == "eval_accuracy 0.75 @ 4"  # best_mode max, best_metric eval_accuracy
    assert b.status == "failed: data file x.json row 3: no field 'output'" and b.steps == "0/6"
    c = rows["broken-one"]  # training.warp: no longer loads; the raw YAML still names what it can
    assert (c.stage, c.method, c.model, c.steps, c.status) == ("sft", "dora", "/models/m", "3/9", "died")
    d = rows["d"]
    assert (d.status, d.steps, d.best, d.exports) == ("new", "0/400", "", [])
    e = rows["e"]  # not even YAML: status.json alone
    assert (e.status, e.stage, e.steps) == ("stopped", "", "2")
    assert rows["a"].updated > rows["d"].updated
    assert scan(root / "missing") == [] and [r.name for r in scan(root / "a")] == ["a"]


def test_curves_metric_names_and_latest(root):
    a, b, c = root / "a", root / "group" / "b", root / "c"
    got = curves([a, b, c], "loss", "train")
    assert got == {"a": [(1, 3.0), (2, 2.0)], "b": [], "broken-one": [(3, 1.0)]}
    assert curves([a, b], "loss", "eval") == {"a": [(2, 2.5), (4, 1.25), (6, 1.5)], "b": [(2, 1.0), (4, 2.0)]}
    twin = root / "group" / "a"
    twin.mkdir()
    assert set(curves([a, twin])) == {str(a), str(twin)}  # two runs named "a": told apart by path
    names = metric_names([a, b])
    assert names[0] == ("train", "loss") and ("eval", "accuracy") in names and ("train", "lr") in names
    assert names.index(("train", "tokens")) < names.index(("eval", "loss")) < names.index(("eval", "accuracy"))
    assert not {k for _, k in names} & {"step", "split", "time"}
    last = latest(a)
    assert (last["step"], last["loss"], last["lr"]) == (6, None, None)  # the NaN step: no loss, no lr
    last = latest(c)
    assert last["step"] == 3 and last["loss"] == 1.0 and last["eval"] is None
    (a / "metrics.jsonl").write_text(json.dumps(train(2, 2.0, tokens=100.0, step_time_s=0.25, lr=5e-4)) + "\n"
                                     + json.dumps(evaluated(2, loss=2.5)) + "\n")  # fmt: skip
    last = latest(a)
    assert (last["step"], last["loss"], last["lr"], last["tokens_per_s"]) == (2, 2.0, 5e-4, 400.0)
    assert last["eval"]["loss"] == 2.5 and latest(root / "nothing")["step"] is None


def test_log_tail_exit_codes_and_refusing_a_live_run_dir(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    assert log_tail(run_dir) == ""
    (run_dir / "train.log").write_text("one\ntwo\n")
    assert log_tail(run_dir) == "one\ntwo\n"
    (run_dir / "board.log").write_text("x" * 50 + "\nstart\ntrain:  10%\rtrain:  50%\rtrain: 100%\r\ndone\n")
    assert log_tail(run_dir) == "x" * 50 + "\nstart\ntrain: 100%\ndone\n"
    assert log_tail(run_dir, n_bytes=10) == "done\n"  # the line cut in two dropped

    code = runs.exit_code
    assert code({"state": "finished"}) == 0 and code({"state": "stopped", "stop_reason": "signal SIGTERM"}) == 143
    assert code({"state": "stopped", "stop_reason": "signal SIGINT"}) == 130 and code(None) == -1
    assert code({"state": "failed", "user_error": True}) == 2 and code({"state": "failed"}) == 1
    assert code({"state": "failed", "error_type": "KeyboardInterrupt"}) == 130 and code({"state": "died"}) == -1

    launcher = Launcher()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "host": HOST,
                                                     "started": time.time()}))  # fmt: skip
    with pytest.raises(RunError, match=f"live run \\(pid {os.getpid()}\\)"):
        launcher.start("cfg.yaml", run_dir)
    assert launcher.poll(run_dir) is None and launcher.wait(run_dir, timeout=0.1) is None
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunError, match="host elsewhere"):
        launcher.resume(run_dir)
    (run_dir / "status.json").write_text(json.dumps({"state": "stopped", "stop_reason": "signal SIGTERM"}))
    assert launcher.poll(run_dir) == 143 and launcher.wait(run_dir) == 143
    with pytest.raises(RunError, match="no live run"):
        launcher.stop(run_dir)


def test_importing_runs_imports_neither_jax_nor_gradio():
    code = "import sys, jaxtune.board.runs; print(sorted({'jax', 'gradio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env=runs.child_env())  # fmt: skip
    assert out.stdout.strip() == "[]"


TINY = [
    "model.random_init.hidden_size=32", "model.random_init.intermediate_size=64",
    "model.random_init.num_hidden_layers=1", "model.random_init.num_attention_heads=2",
    "model.random_init.num_key_value_heads=1", "model.random_init.max_position_embeddings=64",
    "data.cutoff_len=32", "training.batch_size=4", "training.max_steps=300", "training.warmup_steps=0",
    "training.eval_every=0", "training.eval_steps=1", "training.save_every=0", "training.eval_generate=0",
    "training.export_hf=false", "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false",
    "logging.plot=false",
]  # fmt: skip


@pytest.mark.slow
def test_launch_stop_resume_finish_and_export_a_real_run(tmp_path):
    launcher, run_dir = Launcher(), tmp_path / "runs" / "demo"
    (tmp_path / "sft.json").write_text(json.dumps(demo.samples(40, seed=0)))  # small: quick to tokenise
    overrides = [*TINY, "data.train=[sft.json]", "data.eval=[sft.json]"]  # relative to cwd
    pid = launcher.start(REPO / "configs" / "demo.yaml", run_dir, overrides, cwd=tmp_path)
    board = json.loads((run_dir / "board.json").read_text())
    assert board["pid"] == pid and board["cmd"][-1] == f"output_dir={run_dir}" and board["cwd"] == str(tmp_path)
    assert os.getpgid(pid) == pid  # a session of its own: the board's signals never reach it
    with pytest.raises(RunError, match="live run"):
        launcher.start(REPO / "configs" / "demo.yaml", run_dir, overrides)
    deadline = time.time() + 120
    while not any(r["split"] == "train" for r in runs.read_metrics(run_dir)):  # the loop (and its handler) runs
        assert launcher.poll(run_dir) is None, log_tail(run_dir)
        assert time.time() < deadline, log_tail(run_dir)
        time.sleep(0.01)
    assert launcher.stop(run_dir) == pid
    assert launcher.wait(run_dir, timeout=120) == 143, log_tail(run_dir)
    row = scan(tmp_path / "runs")[0]
    assert row.status == "stopped" and 1 <= row.step < 300 and row.total_steps == 300, log_tail(run_dir)
    assert Launcher().poll(run_dir) == 143  # another board (a restarted server) reads it from status.json

    launcher.resume(run_dir)
    assert launcher.wait(run_dir, timeout=240) == 0, log_tail(run_dir)
    row = scan(tmp_path / "runs")[0]
    assert (row.status, row.steps, row.name, row.stage, row.method) == ("finished", "300/300", "demo", "sft", "full")
    assert row.best.startswith("eval_loss ") and row.best.endswith(" @ 300")
    assert "resumed from" in log_tail(run_dir) and log_tail(run_dir).count("==> ") == 2

    code, text, out = export(run_dir)
    assert code == 0, text
    assert out == run_dir / "export" and (out / "config.json").is_file() and "exported step 300" in text
    assert any(out.glob("*.safetensors")) and scan(tmp_path / "runs")[0].exports == ["export"]


@pytest.mark.slow
def test_resume_of_a_cli_run_reruns_its_config_from_the_directory_it_was_started_in(tmp_path):
    """No board.json: `jaxtune train RUN/config.yaml` in the directory its relative output_dir implies; a model
    directory that is not there fails after setup: exit 2, status "failed: <the error line>"."""
    project = tmp_path / "project"
    run_dir = project / "runs" / "cli"
    run_dir.mkdir(parents=True)
    cfg = {"output_dir": "runs/cli", "model": {"path": "models/gone"}, "method": {"name": "lora"},
           "data": {"train": ["x.json"]}}  # fmt: skip
    dump_yaml(load_config(cfg), run_dir / "config.yaml")
    launcher = Launcher()
    launcher.resume(run_dir)
    board = json.loads((run_dir / "board.json").read_text())
    assert board["cwd"] == str(project) and board["cmd"][3:] == ["train", str(run_dir / "config.yaml"),
                                                                 f"output_dir={run_dir}"]  # fmt: skip
    assert launcher.wait(run_dir, timeout=120) == 2, log_tail(run_dir)
    error = log_tail(run_dir).strip().splitlines()[-1]
    assert error.startswith("jaxtune: error: ") and "models/gone" in error, error
    row = scan(project / "runs")[0]
    assert row.status == "failed: " + error.removeprefix("jaxtune: error: ")  # the one-line error, as printed
    assert Launcher().poll(run_dir) == 2  # a user error, as status.json tells another launcher
