"""`jaxtune export`: a run's checkpoint -> a PEFT adapter directory, a merged Hugging Face model, or both.

    jaxtune export runs/lora --adapter out/adapter   # adapter_config.json + adapter_model.safetensors (PEFT)
    jaxtune export runs/lora --merge out/merged      # full HF model with the adapter folded into the weights
    jaxtune export runs/full out/model               # full / BitFit / freeze-tuning: the trained HF model
    jaxtune export --checkpoint runs/lora/checkpoints/200 --out out/adapter --adapter

The run is rebuilt from `run_dir/config.yaml` (the base model from `model.path`, the method's plan from `method`)
and the trained pytree restored from `run_dir/checkpoints/<step>` (the latest unless a step directory is
given); frozen base weights are never in checkpoints, they come from the HF directory again.

Without `--adapter` / `--merge` the natural form is written (`export_plan(mode="auto")`, also what a finished
run writes): methods that train only adapter collections give an adapter; methods that train base parameters
give an HF model, with adapter collections merged into it, or — when some cannot be merged (BitFit biases a
Qwen2 checkpoint has no slot for, prompts, prefixes, bottleneck adapters) — the trained base model plus
`<out>/adapter` on top of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from jaxtune import peft
from jaxtune.peft.names import PeftConfigError

log = logging.getLogger("jaxtune.export")
MODES = ("auto", "adapter", "merge")
UNMERGEABLE = ("prompt", "prefix", "adapter")  # add tokens or layers: no plain HF checkpoint holds them


def export_plan(plan, trainable: dict, out, mode: str = "auto") -> Path:
    """Write `trainable` (shaped like `plan.trainable`) in the form `mode` asks for; returns the directory."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = Path(out)
    base = plan.base_model(trainable)
    adapters = plan.adapters(trainable)
    collections = {k for k, v in adapters.variables.items() if k != "quant" and jax.tree.leaves(v)}
    trains_base = "params" in trainable
    if mode == "adapter":
        if trains_base:
            raise PeftConfigError(
                f"method {'+'.join(plan.methods)} trains base parameters, which an adapter cannot hold: "
                "export with --merge (or without a flag) to get a Hugging Face model"
            )
        return _save_adapter(base, adapters, out)
    if mode == "merge":
        _check_mergeable(collections, plan)
        return _with_tokenizer(peft.merge_and_export(base, adapters, out), base)
    # auto
    if not trains_base:
        return _save_adapter(base, adapters, out)
    if not collections:
        return _with_tokenizer(peft.merge_and_export(base, None, out), base)
    try:
        _check_mergeable(collections, plan)
        return _with_tokenizer(peft.merge_and_export(base, adapters, out), base)
    except PeftConfigError as e:
        log.info("%s; writing the trained base model and the adapter on top of it in %s/adapter", e, out)
    peft.merge_and_export(base, None if "quant" not in adapters.variables else _quant_only(adapters), out)
    _with_tokenizer(out, base)
    _save_adapter(base, adapters, out / "adapter", base_path=str(out))
    return out


def _check_mergeable(collections: set, plan) -> None:
    bad = sorted(collections & set(UNMERGEABLE))
    if bad:
        raise PeftConfigError(
            f"method {'+'.join(plan.methods)}: {', '.join(bad)} adapters add tokens or layers, which a plain "
            "Hugging Face checkpoint cannot hold; export them with --adapter"
        )


def _quant_only(adapters):
    return type(adapters)(variables={"quant": adapters.variables["quant"]}, spec=adapters.spec)


def _with_tokenizer(out: Path, model) -> Path:
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


def _save_adapter(model, adapters, out: Path, base_path: str | None = None) -> Path:
    if base_path is not None:
        model = type(model)(model.arch, model.params, model.tokenizer, model.hf_config, base_path)
    return _with_tokenizer(peft.save_adapter(model, adapters, out), model)


# ----------------------------------------------------------------------------------------------- runs


def resolve(path) -> tuple[Path, int | None]:
    """A run directory, its `checkpoints/` folder, or one step folder -> (run_dir, step or None = latest)."""
    p = Path(path).absolute()
    if p.name.isdigit() and p.parent.name == "checkpoints":
        return p.parent.parent, int(p.name)
    if p.name == "checkpoints":
        return p.parent, None
    if (p / "checkpoints").is_dir() or (p / "config.yaml").exists():
        return p, None
    raise FileNotFoundError(
        f"{path}: not a jaxtune run directory (expected {p}/checkpoints/ and {p}/config.yaml) nor a "
        "checkpoints/<step> folder"
    )


def load_run(path, config=None):
    """(config, plan, trained pytree, step) of a run, restored from its checkpoint."""
    from jaxtune.config import load_config
    from jaxtune.train import optim, setup
    from jaxtune.train import state as state_lib
    from jaxtune.train.checkpoint import Checkpointer

    run_dir, step = resolve(path)
    config_path = Path(config) if config else run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no run config; pass the one the run used with --config")
    cfg = load_config(config_path)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.training, is_async=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint to export")
    model = setup.build_model(cfg)
    m = cfg.model
    plan = peft.prepare(model, cfg.method, jax.random.PRNGKey(cfg.seed), quantization=m.quantization,
                        double_quant=m.double_quant, quant_block_size=m.quant_block_size)  # fmt: skip
    optimizer, _ = optim.build(cfg.training, plan.trainable, 1, plan.lr_multipliers)
    abstract = jax.eval_shape(lambda: state_lib.create(plan.trainable, optimizer, cfg.seed))
    try:
        state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return cfg, plan, state.trainable, step


def export(path, out, mode: str = "auto", config=None) -> Path:
    cfg, plan, trainable, step = load_run(path, config)
    written = export_plan(plan, trainable, out, mode)
    print(
        f"jaxtune: exported step {step} of {cfg.output_dir} ({'+'.join(plan.methods)}, {mode}) to {written}"
    )
    return written


def main(args) -> int:
    """`jaxtune export` (see the module docstring for the accepted argument forms)."""
    from jaxtune.config import ConfigError

    source = args.checkpoint or args.run
    if source is None:
        raise ConfigError("jaxtune export: give the run directory (or checkpoints/<step>) to export")
    mode = "adapter" if args.adapter else "merge" if args.merge else "auto"
    named = [v for v in (args.adapter, args.merge) if isinstance(v, str)]
    out = args.out or (named[0] if named else None)
    if out is None:
        raise ConfigError(
            "jaxtune export: give the output directory (--adapter DIR, --merge DIR or --out DIR)"
        )
    try:
        export(source, out, mode, args.config)
    except (PeftConfigError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    return 0
