"""`jaxtune estimate CONFIG`: how much memory a run needs, before renting the hardware.

Nothing is allocated and no weights are read: the model comes from `config.json` (or `model.random_init`), the
PEFT plan and the optimiser state are traced with `jax.eval_shape`, so the counts are exact for the config's
method, quantisation and optimiser. Activations get two figures:
  - an analytic one per device (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", sec. 4.1: 34·s·b·h + 5·a·s²·b bytes per layer in 16-bit without recomputation; the
    s² term vanishes with flash attention; full remat keeps 2·s·b·h per layer plus one layer's working set);
  - XLA's own buffer assignment for the compiled step on this machine's backend (`memory_analysis()`), for
    models small enough to compile here quickly (it is backend-specific: a GPU/TPU fuses differently).
Per-device figures divide parameters and optimiser state over `fsdp * tensor` and activations over
`data * fsdp` (times `tensor` for the sharded heads/MLP), as `parallel/rules.py` shards them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COMPILE_LIMIT = 1.5e9  # params: above this the compiled figure takes too long on a laptop CPU


def _nbytes(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _gb(n: float) -> str:
    return f"{n / 2**30:8.2f} GB"


def _devices(cfg) -> dict:
    import jax

    p = cfg.parallel
    sizes = {"data": p.data * p.dcn_data, "fsdp": p.fsdp * p.dcn_fsdp, "tensor": p.tensor * p.dcn_tensor}
    known = math.prod(v for v in sizes.values() if v > 0)
    for k, v in sizes.items():
        if v <= 0:
            sizes[k] = max(1, jax.device_count() // known)
    return sizes


def activation_bytes(arch, batch: int, seq: int, remat: str, flash: bool, bytes_per: int = 2) -> int:
    """Analytic activation memory of one step's forward (what backward needs), whole batch, one device."""
    s, b, h, a, layers = seq, batch, arch.hidden_size, arch.num_heads, arch.num_layers
    per_layer_full = 34 * s * b * h * bytes_per // 2 + (0 if flash else 5 * a * s * s * b * bytes_per // 2)
    if remat == "none":
        return layers * per_layer_full
    if remat == "full":
        return layers * 2 * s * b * h + per_layer_full
    if remat == "offload":
        # the kept matmul outputs live in host memory between forward and backward: on the device, the layer
        # input each layer saves plus the one layer being recomputed, as "full"
        return layers * 2 * s * b * h + per_layer_full
    # "dots": matmul outputs are kept (q, k, v, o, gate, up, down), elementwise results recomputed
    kv = arch.num_kv_heads * arch.head_dim
    ffn = arch.experts_per_token * (arch.moe_intermediate_size + h) if arch.num_experts else arch.intermediate_size
    return layers * s * b * (3 * h + 2 * kv + 2 * ffn) * bytes_per + per_layer_full


def estimate(cfg, compile: bool = True) -> dict:
    """Sizes in bytes; `compile=False` skips XLA's figure (the analytic ones need no compilation)."""
    import jax
    import jax.numpy as jnp

    from jaxtune.data.batch import TokenBatch
    from jaxtune.methods import METHODS
    from jaxtune.models import attention
    from jaxtune.train import optim, state
    from jaxtune.train.run import build_run
    from jaxtune.train.step import make_train_step

    m, t = cfg.model, cfg.training
    # the run training would build, as shapes: model (vocabulary from the configured tokenizer), PEFT plan,
    # the stage's extra trainables (score head, value model), optimiser state
    run = build_run(cfg, abstract=True, weights=False)
    arch, trainable, frozen = run.model.arch, run.state.trainable, run.frozen
    opt_state, optimizer, lr = run.state.opt_state, run.optimizer, run.lr
    base = _count(run.model.params)
    micro = t.micro_batch_size or t.batch_size
    seq = cfg.data.cutoff_len
    sizes = _devices(cfg)
    shard_params = sizes["fsdp"] * sizes["tensor"]
    shard_batch = sizes["data"] * sizes["fsdp"]
    per_dev_batch = max(1, micro // shard_batch)
    flash = attention.uses_kernel(run.lm.arch, m.attention_impl, seq)  # no [T, T] scores kept (auto: here)
    act = activation_bytes(arch, per_dev_batch, seq, m.remat, flash=flash,
                           bytes_per=jnp.dtype(m.dtype).itemsize) // sizes["tensor"]  # fmt: skip
    out = {
        "model_type": arch.model_type,
        "base_params": base,
        # mixture of experts: what one token meets (its top-k experts of every layer); = base_params if dense
        "active_params": base - arch.num_params() + arch.active_params(),
        "experts": f"{arch.experts_per_token} of {arch.num_experts}" if arch.num_experts else None,
        "trainable_params": _count(trainable),
        "trainable_fraction": _count(trainable) / max(base, 1),
        "frozen_bytes": _nbytes(frozen),
        "trainable_bytes": _nbytes(trainable),
        "grad_bytes": 4 * _count(trainable),  # accumulated in fp32 inside the step
        "optimizer_bytes": _nbytes(opt_state),
        "activation_bytes_per_device": act,
        "mesh": sizes,
        "micro_batch_per_device": per_dev_batch,
        "seq": seq,
    }
    state_bytes = out["frozen_bytes"] + out["trainable_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    out["per_device_bytes"] = state_bytes // shard_params + act

    if compile and base <= COMPILE_LIMIT:
        # the token-level step of the stage (SFT's for pair / kto / prompt stages: the same forward and backward
        # over one [B, T] batch, the stage's own extras aside)
        lm_stage = run.method.data_kind in ("text", "lm")
        method = run.method if lm_stage else METHODS["sft"]
        if not lm_stage:
            trainable, frozen = run.plan.trainable, run.plan.frozen
            optimizer, lr = optim.build(t, trainable, max(t.max_steps, 1))
        step = make_train_step(method, run.lm, cfg, optimizer, lr, accum=t.accumulation_steps)
        abstract_state = jax.eval_shape(lambda tr: state.create(tr, optimizer, cfg.seed), trainable)
        i32 = jax.ShapeDtypeStruct((t.batch_size, seq), jnp.int32)
        batch = TokenBatch(i32, i32, jax.ShapeDtypeStruct((t.batch_size, seq), jnp.float32), i32, i32)
        mem = step.lower(abstract_state, frozen, batch).compile().memory_analysis()
        if mem is not None:
            out["xla_backend"] = jax.default_backend()
            out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
            out["xla_total_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                         + mem.temp_size_in_bytes - mem.alias_size_in_bytes)  # fmt: skip
    return out


def main(cfg) -> dict:
    out = estimate(cfg)
    name = cfg.model.path or out["model_type"] + " (random_init)"
    methods = (cfg.method.name, *cfg.method.combine)
    lines = [
        f"model {name}: {out['base_params'] / 1e9:.3f} B params; method {'+'.join(methods)}: "
        f"{out['trainable_params']:,} trainable ({100 * out['trainable_fraction']:.3f}%)",
        *([f"  active per token      {out['active_params'] / 1e9:.3f} B params ({out['experts']} experts)"]
          if out["experts"] else []),
        f"  frozen weights        {_gb(out['frozen_bytes'])}   (quantization: {cfg.model.quantization})",
        f"  trainable weights     {_gb(out['trainable_bytes'])}",
        f"  gradients (fp32)      {_gb(out['grad_bytes'])}",
        f"  {'optimizer (' + cfg.training.optimizer + ')':22s}{_gb(out['optimizer_bytes'])}",
        f"  mesh {out['mesh']}: state / {out['mesh']['fsdp'] * out['mesh']['tensor']} devices",
        f"  activations / device  {_gb(out['activation_bytes_per_device'])}   "
        f"({out['micro_batch_per_device']} x {out['seq']} tokens, remat={cfg.model.remat}, "
        f"attention={cfg.model.attention_impl})",
        f"  total / device        {_gb(out['per_device_bytes'])}   (analytic)",
    ]
    if "xla_total_bytes" in out:
        lines.append(f"  XLA compiled step     {_gb(out['xla_total_bytes'])}   (one device, {out['xla_backend']} "
                     f"backend; temporaries {out['xla_temp_bytes'] / 2**30:.2f} GB)")  # fmt: skip
    print("\n".join(lines))
    if cfg.output_dir:
        path = Path(cfg.output_dir)
        if path.is_dir():
            (path / "estimate.json").write_text(json.dumps(out, indent=2))
    return out
