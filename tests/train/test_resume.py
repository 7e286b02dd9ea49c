"""Resume that cannot be broken, and says what happened:
- a signal stops `jaxtune train` after a checkpoint with exit status 128 + N (the summary keeps the reason);
- the steps a stopped run logged after its last checkpoint are dropped before the resumed run logs them again,
  in metrics.jsonl and in the TensorBoard event files, so each step is recorded once;
- a damaged newest checkpoint is reported in one line and the newest intact one is used, the loss curve going on
  exactly as an uninterrupted run's; with none intact, one error line names the directory and how to start fresh;
- a save that fails verification deletes no older checkpoint (keep_last)."""

import json
import logging
import os
import signal
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from train.test_loop import tiny, train_losses

from jaxtune import cli, demo
from jaxtune.config import TrainingConfig, load_config
from jaxtune.train import loop
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.metrics import drop_after, read_records


def tb_steps(run_dir: Path) -> Counter:
    """(tag, step) -> how many scalar events of it the TensorBoard event files on disk hold."""
    from tensorboardX.proto.event_pb2 import Event

    seen = Counter()
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for record in read_records(path):
            event = Event.FromString(record)
            for value in event.summary.value:
                seen[(value.tag, event.step)] += 1
    return seen


def jsonl_keys(run_dir: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"]) for r in rows]


def in_step(monkeypatch, n: int, action) -> None:
    """The next run `loop.run` builds calls `action(run)` inside its n-th train-step call."""
    build = loop.build_run

    def building(cfg):
        run = build(cfg)
        step_fn, calls = run.train_step, []

        def stepping(state, frozen, batch):
            calls.append(1)
            if len(calls) == n:
                action(run)
            return step_fn(state, frozen, batch)

        run.train_step = stepping
        monkeypatch.setattr(loop, "build_run", build)
        return run

    monkeypatch.setattr(loop, "build_run", building)


def stop_at(monkeypatch, n: int, sig=signal.SIGTERM) -> None:
    """The next run `jaxtune train` builds gets `sig` from inside its n-th step call (as a preemption would)."""
    in_step(monkeypatch, n, lambda run: os.kill(os.getpid(), sig))


def largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def truncate_largest_array_file(step_dir: Path) -> None:
    big = largest_array_file(step_dir)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


def test_damaged_latest_checkpoint_resumes_from_the_intact_one_and_records_each_step_once(
    tmp_path, monkeypatch, capsys
):
    """Straight: 6 steps. Stopped: SIGTERM during step 4 (exit 143, checkpoints 2 and 4, metrics of steps 1-4 and
    the step-4 eval), then checkpoint 4 truncated: the rerun says so in one line, resumes from 2 and its losses of
    steps 3-6 are the straight run's exactly; metrics.jsonl and TensorBoard hold each step once. Then with every
    checkpoint damaged the run refuses in one line and moves nothing."""
    common = dict(max_steps=6, save_every=2, eval_every=4, eval_steps=1, keep_last=3, export_hf=False)
    (tmp_path / "sft.json").write_text(json.dumps(demo.samples(40, seed=0)))  # 3 steps an epoch: resume crosses one

    def config(name):
        cfg = tiny(tmp_path / name, **common)
        cfg["data"].update(train=[str(tmp_path / "sft.json")], eval=[str(tmp_path / "sft.json")])
        return {**cfg, "logging": {"log_every": 1, "progress": False, "tensorboard": True, "plot": False}}

    straight = config("a")
    assert loop.run(load_config(straight))["stop_reason"] == "completed"
    reference = train_losses(tmp_path / "a" / "run")

    cfg = config("b")
    run_dir, path = tmp_path / "b" / "run", tmp_path / "b.json"
    path.write_text(json.dumps(cfg))
    stop_at(monkeypatch, 4)
    assert cli.main(["train", str(path)]) == 143  # 128 + SIGTERM
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4] and ("eval", 4) in jsonl_keys(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [2, 4]
    truncate_largest_array_file(ckpts / "4")
    capsys.readouterr()

    assert cli.main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    about_4 = [line for line in err.splitlines() if "checkpoints/4:" in line]
    assert len(about_4) == 1 and "is truncated" in about_4[0] and "trying step 2" in about_4[0], err
    assert "Traceback" not in err and "Event loop is closed" not in err and "ERROR" not in err, err
    assert (run_dir / "checkpoints.damaged" / "4").is_dir()
    resumed = train_losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):
        assert resumed[step] == reference[step], step  # the same computation: equal, not approximately
    keys = jsonl_keys(run_dir)
    assert len(keys) == len(set(keys)) and ("eval", 4) in keys  # steps 3, 4 and the step-4 eval logged once
    events = tb_steps(run_dir)
    assert events and set(events.values()) == {1}, events
    assert {step for tag, step in events if tag == "train/loss"} == set(range(1, 7))

    # no checkpoint intact (a truncated / a missing array file, a data item that parses but is no iterator position)
    kept = sorted(int(p.name) for p in ckpts.iterdir())
    assert kept == [2, 4, 6]
    truncate_largest_array_file(ckpts / "2")
    largest_array_file(ckpts / "4").unlink()  # Orbax's failing reads of this one printed ~1500 traceback lines
    (ckpts / "6" / "data" / "metadata").write_text('{"epoch": 0}')
    capsys.readouterr()
    assert cli.main(["train", str(path), "training.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    assert [line for line in err.splitlines() if "checkpoints/6:" in line][0].endswith(
        "the data item lacks the keys ['cursor', 'row', 'seed', 'window']; trying step 4"
    )
    assert "checkpoints/4: state: the array file of" in err and "is missing; trying step 2" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"jaxtune: error: no checkpoint in {ckpts} can be restored (steps [2, 4, 6]")
    assert "set a new output_dir" in last and "move" in last
    assert sorted(int(p.name) for p in ckpts.iterdir()) == kept  # refused, nothing moved


def test_a_save_that_fails_verification_deletes_no_older_checkpoint(tmp_path, caplog):
    t = TrainingConfig(keep_last=1, keep_best=False)
    ckpt = Checkpointer(tmp_path / "checkpoints", t, is_async=True)
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones((3,))}
    data, meta = {"row": 0}, {"history": []}
    for step in (1, 2):
        ckpt.save(step, state, data, meta)
    ckpt.manager.wait_until_finished()  # step 2 committed; its verification waits for the next save
    assert sorted(ckpt.manager.all_steps()) == [1, 2]  # 1 goes only once 2 is verified
    truncate_largest_array_file(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="jaxtune.train"):
        ckpt.save(3, state, data, meta)
        ckpt.manager.wait_until_finished()
    failed = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(failed) == 1 and "checkpoints/2 " in failed[0] and "is truncated" in failed[0], failed
    assert sorted(ckpt.manager.all_steps()) == [1, 2, 3]  # the good step 1 survived keep_last=1
    ckpt.close()  # step 3 verified: now keep_last=1 keeps only it
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]


def test_drop_after_rewrites_jsonl_and_event_files_and_drops_a_cut_record(tmp_path):
    from tensorboardX import SummaryWriter

    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "spl')  # a kill mid-line
    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for s in range(1, 6):
        writer.add_scalar("train/loss", 1.0 / s, s)
    writer.close()
    events = next((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes() + events.read_bytes()[-30:-7])  # a record cut short
    drop_after(tmp_path, 3)
    assert jsonl_keys(tmp_path) == [("train", 1), ("train", 2), ("train", 3)]
    assert sorted(tb_steps(tmp_path)) == [("train/loss", 1), ("train/loss", 2), ("train/loss", 3)]
    assert not list(tmp_path.rglob("*.tmp"))
    assert np.isclose(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"], 1 / 3)
