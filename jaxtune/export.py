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
from jaxtune.errors import RunError
from jaxtune.models.adapters_hook import UNMERGEABLE
from jaxtune.peft.names import PeftConfigError

log = logging.getLogger("jaxtune.export")
MODES = ("auto", "adapter", "merge")


def export_plan(plan, trainable: dict, out, mode: str = "auto") -> Path:
    """Write `trainable` (shaped like `plan.trainable`) in the form `mode` asks for; returns the directory."""
    if mode not in MODES:
        raise RunError(f"mode must be one of {MODES}, got {mode!r}")
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


def natural_dir(run) -> str:
    """Where a finished run writes its export: `hf` (a model) or `adapter` (a PEFT adapter)."""
    model = run.method.export is not None or "params" in run.policy_trainable
    return "hf" if model else "adapter"


def export_trained(run, trainable: dict, out, mode: str = "auto") -> Path:
    """A run's trained tree (the policy's: `Run.policy_trainable`) in the form `mode` asks for: the stage's own
    export when its method record has one (RM: a sequence classifier), else `export_plan`."""
    if run.method.export is not None:
        return run.method.export(run.model, run.plan, trainable, out, mode)
    return export_plan(run.plan, trainable, out, mode)


def export(path, out, mode: str = "auto", config=None) -> Path:
    """`jaxtune export`: the run at `path` (run dir, checkpoints/ or checkpoints/<step>) rebuilt abstractly
    (train/run.py `load_run`), its checkpoint restored into it, and written as `mode` says."""
    from jaxtune.train.run import load_run

    if mode not in MODES:
        raise RunError(f"mode must be one of {MODES}, got {mode!r}")
    run, step = load_run(path, config)
    written = export_trained(run, run.policy_trainable, out, mode)
    print(f"jaxtune: exported step {step} of {run.run_dir} (stage {run.cfg.stage}, {'+'.join(run.plan.methods)}, "
          f"{mode}) to {written}")  # fmt: skip
    return written


def main(args) -> int:
    """`jaxtune export` (see the module docstring for the accepted argument forms).

    RUN_DIR is the first positional or `--checkpoint`; OUT the positional after it (the only one, with
    `--checkpoint`), `--out`, or the directory given to `--adapter` / `--merge`: any of these, but one
    directory."""
    from jaxtune.config import ConfigError

    given = [v for v in (args.run, getattr(args, "out_dir", None)) if v is not None]
    if args.checkpoint is not None:
        if len(given) > 1:
            raise ConfigError(
                f"jaxtune export: the run is given twice (--checkpoint {args.checkpoint} and {given[0]}); "
                "give RUN_DIR OUT, or --checkpoint RUN_DIR OUT"
            )
        source, positional_out = args.checkpoint, (given or [None])[0]
    else:
        source, positional_out = (given + [None, None])[:2]
    if source is None:
        raise ConfigError("jaxtune export: give the run directory (or checkpoints/<step>) to export")
    mode = "adapter" if args.adapter else "merge" if args.merge else "auto"
    outs = {
        "OUT": positional_out,
        "--out": args.out,
        "--adapter": args.adapter if isinstance(args.adapter, str) else None,
        "--merge": args.merge if isinstance(args.merge, str) else None,
    }
    outs = {k: v for k, v in outs.items() if v is not None}
    if not outs:
        raise ConfigError(
            "jaxtune export: give the output directory (OUT, --out DIR, --adapter DIR or --merge DIR)"
        )
    if len({str(Path(v)) for v in outs.values()}) > 1:
        named = ", ".join(f"{k} {v}" for k, v in outs.items())
        raise ConfigError(f"jaxtune export: two output directories ({named}); give one")
    out = next(iter(outs.values()))
    try:
        export(source, out, mode, args.config)
    except (PeftConfigError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    return 0
