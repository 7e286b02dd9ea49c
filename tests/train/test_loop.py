"""The training loop end to end: resume after SIGTERM continues bit-identically, kill -9 mid-save leaves a
loadable checkpoint, early stopping, keep-best, NaN handling, plots, and the README's demo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jaxtune
from jaxtune.config import load_config
from jaxtune.train.loop import NonFiniteLoss, run

REPO = Path(__file__).resolve().parents[2]


def tiny(tmp_path, **training):
    """A small Llama on the demo task; steps take a few ms so whole runs fit in seconds."""
    return {
        "stage": "sft",
        "output_dir": str(tmp_path / "run"),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"train": ["builtin:demo"], "cutoff_len": 48, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "save_every": 0, **training},
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")
    rows = [json.loads(line) for line in lines[:-1]]  # the last piece may be a line still being written
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def cli(cfg: dict, tmp_path: Path, *overrides, name="cfg.json") -> subprocess.Popen:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxtune", "train", str(path), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.002)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigterm_then_resume_continues_bit_identically(tmp_path):
    """200 steps straight vs. SIGTERM at ~step 120 (exit 143) + rerun: every loss after the stop is identical."""
    straight = tiny(tmp_path / "a", max_steps=200)
    proc = cli(straight, tmp_path, name="a.json")
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    reference = train_losses(Path(straight["output_dir"]))

    interrupted = tiny(tmp_path / "b", max_steps=200)
    run_dir = Path(interrupted["output_dir"])
    proc = cli(interrupted, tmp_path, name="b.json")
    wait_for_step(run_dir, proc, 120)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out  # 128 + SIGTERM: launchers and schedulers restart it
    assert "interrupted by SIGTERM" in out
    stopped = max(train_losses(run_dir))
    assert 120 <= stopped < 200, "the signal must land mid-run for this test to mean anything"

    proc = cli(interrupted, tmp_path, name="b.json")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    resumed = train_losses(run_dir)
    assert max(resumed) == 200
    for step in range(stopped + 1, 201):
        assert resumed[step] == reference[step], step  # bit-identical, not approximately equal


def test_kill9_during_async_save_leaves_a_loadable_checkpoint(tmp_path):
    cfg = tiny(tmp_path, max_steps=400, save_every=1, keep_last=2)
    run_dir = Path(cfg["output_dir"])
    proc = cli(cfg, tmp_path)
    wait_for_step(run_dir, proc, 30)
    proc.send_signal(signal.SIGKILL)  # saves happen every step, so one is in flight
    proc.wait(timeout=60)
    from jaxtune.train.checkpoint import Checkpointer

    latest = Checkpointer(run_dir / "checkpoints", load_config(cfg).training).latest_step()
    assert latest is not None and latest >= 1
    proc = cli({**cfg, "training": {**cfg["training"], "max_steps": latest + 5}}, tmp_path, name="resume.json")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert max(train_losses(run_dir)) == latest + 5


def test_early_stopping_and_keep_best(tmp_path):
    """best_mode=max on eval_loss marks the *first* eval best while training lowers the loss: with patience 2
    the run stops after 3 evals, and the best checkpoint survives keep_last=1 rotation."""
    cfg = load_config(tiny(tmp_path, max_steps=100, eval_every=5, keep_last=1, best_mode="max",
                           early_stopping_patience=2))
    summary = run(cfg)
    assert summary["stop_reason"] == "early_stopping"
    assert summary["step"] == 15 and len(summary["history"]) == 3
    assert summary["best_step"] == 5
    kept = sorted(int(p.name) for p in (Path(cfg.output_dir) / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [5, 15]
    # which checkpoint is the best is on record: status.json, train.log, and the printed summary
    status = json.loads((Path(cfg.output_dir) / "status.json").read_text())
    assert (status["best_step"], status["best_metric"]) == (5, "eval_loss")
    assert status["best_value"] == pytest.approx(summary["history"][0])
    log = (Path(cfg.output_dir) / "train.log").read_text()
    assert f"best eval_loss {summary['history'][0]:.4f} at step 5 (checkpoint {Path(cfg.output_dir).absolute()}/checkpoints/5)" in log


def test_nan_loss_stops_and_names_the_checkpoint(tmp_path):
    cfg = load_config(tiny(tmp_path, max_steps=50, learning_rate=1e9, max_grad_norm=0.0, save_every=1))
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+ .*last good checkpoint: .*checkpoints/\d+"):
        run(cfg)


def test_nan_skip_keeps_going(tmp_path):
    cfg = load_config(tiny(tmp_path, max_steps=20, learning_rate=1e9, max_grad_norm=0.0, nan_policy="skip"))
    assert run(cfg)["step"] == 20


def test_plot_writes_png(tmp_path):
    cfg = load_config(tiny(tmp_path, max_steps=10, eval_every=5))
    run(cfg)
    out = subprocess.run([sys.executable, "-m", "jaxtune", "plot", cfg.output_dir], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    png = Path(cfg.output_dir) / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_learns_the_task(tmp_path):
    """The README's main job: exact match from < 10% to > 80% (the config's own settings, only the run dir moved)."""
    summary = jaxtune.train(str(REPO / "configs" / "demo.yaml"), output_dir=str(tmp_path / "demo"),
                            logging={"progress": False})
    assert summary["generate_accuracy_before"] < 0.10
    assert summary["generate_accuracy_after"] > 0.80
    assert Path(summary["export"], "config.json").exists()


def test_resume_policies(tmp_path):
    """must: an error naming the directory when there is no checkpoint; never: refuses a directory that holds
    checkpoints rather than overwriting them, and trains from scratch in an empty one."""
    with pytest.raises(FileNotFoundError, match=r"training.resume=must but .*run/checkpoints holds no checkpoint"):
        run(load_config(tiny(tmp_path, max_steps=2, resume="must")))
    assert run(load_config(tiny(tmp_path, max_steps=2, resume="never")))["stop_reason"] == "completed"
    with pytest.raises(FileExistsError, match=r"resume=never but .*run/checkpoints already holds checkpoints \(latest: step 2\)"):
        run(load_config(tiny(tmp_path, max_steps=4, resume="never")))
    assert run(load_config(tiny(tmp_path, max_steps=2, resume="must")))["stop_reason"] == "completed"


def test_eval_generate_answers_the_held_out_split(tmp_path):
    """training.eval_generate with only data.val_size: the greedy answers come from the held-out rows (the ones
    eval loss uses, with the data's own columns and max_samples), before and after; without any eval data it is
    a config error before training, not a crash at the end that loses the export."""
    from jaxtune import demo
    from jaxtune.config import ConfigError
    from jaxtune.data.pipeline import eval_records

    rows = [{"q": s["instruction"] + " " + s["input"], "a": s["output"]} for s in demo.samples(60, seed=1)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    source = {"path": str(tmp_path / "d.json"), "format": "alpaca", "columns": {"prompt": "q", "response": "a"},
              "max_samples": 50}  # fmt: skip
    cfg = tiny(tmp_path, max_steps=2, eval_generate=3)
    cfg["data"] = {**cfg["data"], "train": [source], "val_size": 6}
    held_out = eval_records(load_config(cfg).data, seed=0)
    assert len(held_out) == 6
    summary = run(load_config(cfg))
    assert summary["generate_accuracy_before"] is not None and summary["generate_accuracy_after"] is not None
    prompts = {r.messages[-2].content for r in held_out}
    assert [p for p, _, _ in summary["samples"]] and all(p in prompts for p, _, _ in summary["samples"])
    assert Path(summary["export"], "config.json").exists()

    cfg["data"] = {**cfg["data"], "val_size": 0.0}
    cfg["output_dir"] = str(tmp_path / "no_eval")
    with pytest.raises(ConfigError, match=r"training.eval_generate=3 needs eval data: give data.eval, or .*val_size"):
        run(load_config(cfg))
