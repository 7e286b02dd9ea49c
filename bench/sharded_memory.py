"""Per-device memory of the compiled, sharded train step on 8 fake CPU devices, one mesh shape after another.

    python bench/sharded_memory.py                      # full fine-tuning, AdamW, fp32, preset "tiny"
    python bench/sharded_memory.py --method lora --preset small

Prints one JSON line: {"device", "preset", "method", "params", "batch", "seq", "meshes": {"1 device" | "(d, f, t)":
{argument, output, alias, temp, state}}} in bytes per device. `argument` is what the step's inputs occupy on
one device (train state + frozen weights + batch), `alias` the part of it donated and reused for the outputs,
`temp` XLA's scratch (activations, gathered weights), `state` the train state alone (params + optimiser) from
the shardings. XLA:CPU's buffer assignment, not a GPU's or a TPU's: the argument / state figures carry over
(they are the shard sizes), temp does not. Never asserted; figures go to bench/RESULTS.md with date and device.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
)

import jax  # noqa: E402
import numpy as np  # noqa: E402

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip
METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "rank": 16, "target_modules": "all-linear"}}
MESHES = [None, (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def measure(preset: str, method: str, batch: int, seq: int) -> dict:
    import jaxtune
    from jaxtune import peft
    from jaxtune.config import load_config
    from jaxtune.data.batch import TokenBatch
    from jaxtune.methods import sft
    from jaxtune.methods.forward import LM
    from jaxtune.parallel import make_mesh, place
    from jaxtune.train import optim
    from jaxtune.train import state as state_lib
    from jaxtune.train.sharding import bytes_per_device, global_batch, run_shardings
    from jaxtune.train.step import make_train_step

    cfg = load_config({"training": {"batch_size": batch}})
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = jaxtune.from_hf_config({"model_type": "llama", **PRESETS[preset]}, mesh=one)
    ids = np.ones((batch, seq), np.int32)
    host_batch = TokenBatch(
        ids, ids, np.ones((batch, seq), np.float32), ids, np.tile(np.arange(seq), (batch, 1))
    )
    out = {}
    for shape in MESHES:
        mesh = one if shape is None else make_mesh(*shape)
        plan = peft.prepare(model, METHODS[method], 0)
        optimizer, lr = optim.build(cfg.training, plan.trainable, 10)
        shardings = run_shardings(mesh, plan.arch, plan.trainable, plan.frozen, optimizer)
        state = state_lib.create(jax.tree.map(jax.numpy.copy, plan.trainable), optimizer, 0, shardings.state)
        frozen = place(plan.frozen, shardings.frozen)
        step = make_train_step(sft.SFT, LM(plan.arch), cfg, optimizer, lr, shardings=shardings)
        stats = step.lower(state, frozen, global_batch(host_batch, mesh)).compile().memory_analysis()
        row = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
        row["state"] = bytes_per_device(shardings.state, state)
        out["1 device" if shape is None else str(shape)] = row
    return {"params": model.num_params(), "meshes": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--method", choices=sorted(METHODS), default="full")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    result = measure(args.preset, args.method, args.batch, args.seq)
    device = f"{jax.devices()[0].platform}, {jax.device_count()} fake XLA host devices"
    print(json.dumps({"device": device, "preset": args.preset, "method": args.method, "batch": args.batch,
                      "seq": args.seq, **result}))  # fmt: skip


if __name__ == "__main__":
    main()
