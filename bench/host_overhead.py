"""Host overhead of the SFT loop: steady-state step time of the real `jaxtune.train.loop.run` (training.prefetch
0 and 2) against the isolated jitted step called in a tight loop on one fixed batch.

    python bench/host_overhead.py                       # tiny preset, 60 steps
    python bench/host_overhead.py --steps 100 --batch 32

Prints one JSON line:
  {"device", "preset", "steps", "batch", "seq", "isolated_step_ms", "loop": {"prefetch_0": {step_ms,
   overhead_pct}, "prefetch_2": {...}}}

The loop's figure is the median of `step_time_s` (metrics.jsonl, wall time between consecutive steps' metrics)
over the steady-state steps (the first `--warmup` and the last one, which also evaluates and saves, left out);
the isolated figure is the median of `run.train_step(...)` + block_until_ready on a batch placed once.
overhead_pct = loop / isolated - 1. Never asserted anywhere: figures go to bench/RESULTS.md with date and device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

PRESETS = {
    # the shape of tests/train/test_loop.py's model: steps of a few ms, so host costs show
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128),
}  # fmt: skip


def config(out: Path, preset: str, steps: int, batch: int, seq: int, prefetch: int) -> dict:
    return {
        "stage": "sft",
        "output_dir": str(out),
        "model": {"tokenizer": "builtin:chars", "random_init": {"model_type": "llama", **PRESETS[preset]}},
        "data": {"train": ["builtin:demo"], "cutoff_len": seq, "bucket_multiple": seq},
        "method": {"name": "full"},
        "training": {"learning_rate": 1e-3, "batch_size": batch, "max_steps": steps, "save_every": 0,
                     "export_hf": False, "prefetch": prefetch},
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }


def loop_step_ms(cfg: dict, warmup: int) -> float:
    from jaxtune.config import load_config
    from jaxtune.train.loop import run

    run(load_config(cfg))
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if r["split"] == "train"][warmup:-1]
    return 1e3 * statistics.median(times)


def isolated_step_ms(cfg: dict, steps: int, warmup: int) -> float:
    import jax

    from jaxtune.config import load_config
    from jaxtune.train.run import build_run
    from jaxtune.train.sharding import global_batch

    run = build_run(load_config(cfg))
    batch = global_batch(next(iter(run.train_it)), run.mesh)
    state, times = run.state, []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = run.train_step(state, run.frozen, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    run.checkpointer.close()
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        make = lambda name, prefetch: config(Path(tmp, name), args.preset, args.steps, args.batch, args.seq, prefetch)
        isolated = isolated_step_ms(make("isolated", 0), args.steps, args.warmup)
        loop = {}
        for prefetch in (0, 2):
            ms = loop_step_ms(make(f"prefetch_{prefetch}", prefetch), args.warmup)
            overhead = round(100 * (ms / isolated - 1), 2)
            loop[f"prefetch_{prefetch}"] = {"step_ms": round(ms, 3), "overhead_pct": overhead}
    device = jax.devices()[0]
    print(json.dumps({"device": f"{device.platform} ({getattr(device, 'device_kind', '')})", "preset": args.preset,
                      "steps": args.steps, "batch": args.batch, "seq": args.seq,
                      "isolated_step_ms": round(isolated, 3), "loop": loop}))  # fmt: skip


if __name__ == "__main__":
    main()
