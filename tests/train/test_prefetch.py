"""The loop that never waits for the host: batches prefetched on a thread and metrics read one step late change
nothing a run records; resume after an interrupt with prefetch stays bit-identical; producer errors surface."""

import json
import os
import signal
import threading
from pathlib import Path

import jax
import pytest

from jaxtune.config import load_config
from jaxtune.data.errors import DataError
from jaxtune.train import loop
from jaxtune.train.prefetch import Prefetcher
from jaxtune.train.run import build_run

STEPS = 12


def tiny(out: Path, **training) -> dict:
    return {
        "stage": "sft",
        "output_dir": str(out),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}},
        "data": {"train": ["builtin:demo"], "cutoff_len": 48, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "save_every": 0, "max_steps": STEPS,
                     "eval_every": 5, "eval_steps": 1, "export_hf": False, **training},
        "logging": {"log_every": 2, "progress": False, "tensorboard": False, "plot": False},
    }


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "step_time_s")} for r in rows]


def interrupt_at(run, n: int) -> None:
    """SIGTERM from inside the n-th step call: the loop's Signals handler sees it, checkpoints and stops."""
    step_fn, calls = run.train_step, []

    def interrupting(state, frozen, batch):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(state, frozen, batch)

    run.train_step = interrupting


def test_prefetch_late_metrics_and_resume_record_what_the_synchronous_loop_does(tmp_path):
    """prefetch=0 straight (each step's metrics also read synchronously, inside the step, as the oracle) vs.
    prefetch=2 interrupted by SIGTERM at step 7 while the producer has read ahead, then resumed: metrics.jsonl
    holds the same records, bit for bit (wall-clock fields aside), so the checkpoint carried the data position
    of the batch step 7 consumed and reading metrics one step late changed nothing."""
    run = build_run(load_config(tiny(tmp_path / "p0", prefetch=0)))
    step_fn, oracle = run.train_step, {}

    def synchronous(state, frozen, batch):
        state, metrics = step_fn(state, frozen, batch)
        oracle[len(oracle) + 1] = (float(jax.device_get(metrics["loss"])), run.train_it.efficiency)
        return state, metrics

    run.train_step = synchronous
    loop.train(run)
    sync = records(tmp_path / "p0")
    train = {r["step"]: r for r in sync if r["split"] == "train"}
    assert sorted(train) == list(range(2, STEPS + 1, 2))  # log_every cadence, the last step included
    for step, r in train.items():
        assert (r["loss"], r["data_efficiency"]) == oracle[step], step  # exact, not approximately
    assert [r["step"] for r in sync if r["split"] == "eval"] == [5, 10, STEPS]

    cfg = load_config(tiny(tmp_path / "p2", prefetch=2))
    run = build_run(cfg)
    interrupt_at(run, 7)
    summary = loop.train(run)
    assert summary["stop_reason"] == "signal SIGTERM" and summary["step"] == 7
    assert loop.run(cfg)["step"] == STEPS
    # every record, eval included, identical; except that the packing-efficiency counters restart on resume
    # (they are not part of the iterator's saved state, with or without prefetch)
    resumed = [r if r["step"] <= 7 else {**r, "data_efficiency": None} for r in records(tmp_path / "p2")]
    assert resumed == [r if r["step"] <= 7 else {**r, "data_efficiency": None} for r in sync]
    rows = [json.loads(x) for x in (tmp_path / "p2" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step_time_s"] > 0 for r in rows if r["split"] == "train")


class Rows:
    """A train iterator that fails in row `bad` (or never, with bad=None)."""

    def __init__(self, bad=None):
        self.row, self.bad, self.efficiency = 0, bad, 1.0

    def __iter__(self):
        return self

    def __next__(self):
        self.row += 1
        if self.row == self.bad:
            raise DataError(f"row {self.row}: 'messages' must be a list")
        return self.row

    def get_state(self):
        return {"row": self.row}


def test_producer_error_surfaces_with_its_message():
    with pytest.raises(DataError, match="row 1234: 'messages' must be a list"):
        with Prefetcher(Rows(bad=1234), None, count=2000, depth=2, place=lambda b, m: b) as batches:
            got = [next(batches) for _ in range(2000)]
    assert not any(t.name == "jaxtune-prefetch" for t in threading.enumerate())
    with Prefetcher(Rows(), None, count=5, depth=2, place=lambda b, m: b) as batches:
        got = list(batches)
    assert [(p.batch, p.data_state) for p in got] == [(i, {"row": i}) for i in range(1, 6)]  # state per batch


def test_close_stops_a_producer_blocked_on_a_full_queue():
    batches = Prefetcher(Rows(), None, count=10**9, depth=2, place=lambda b, m: b)
    assert next(batches).data_state == {"row": 1}
    batches.close()
    assert not any(t.name == "jaxtune-prefetch" for t in threading.enumerate())
