"""`prepare`: one method config -> a `Plan`, the contract between PEFT and the trainer.

    plan = jaxtune.peft.prepare(model, cfg.method, rng, quantization=cfg.model.quantization, ...)
    def loss(trainable, frozen, batch):
        variables = jaxtune.peft.merge_variables(frozen, trainable)      # what Decoder(plan.arch).apply takes
        ...
    grads = jax.grad(loss)(plan.trainable, plan.frozen, batch)            # frozen is never differentiated

`frozen` and `trainable` are dicts of Flax collections ({"params": ..., "quant": ...} and {"lora": ...}, or
{"params": <subset>} for full / BitFit / freeze, or both for combinations); `lr_multipliers` is shaped like
`trainable` (1.0, LoRA+ B matrices the ratio). Combinations are several methods' parts merged: LoRA + prefix is
{"lora": ..., "prefix": ...}, as MAM adapters / UniPELT combine methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import traverse_util

from jaxtune.models.arch import ArchConfig, PeftSpec
from jaxtune.models.model import Adapters, Model, with_peft
from jaxtune.peft import adapters, experts, lora, names, prompts, quant, select
from jaxtune.peft.names import PeftConfigError
from jaxtune.peft.parts import Context, Part
from jaxtune.peft.settings import SELECTION, method_config, methods_of

BUILDERS = {
    "full": select.build_full,
    "lora": lora.build,
    "qlora": lora.build,
    "dora": lora.build,
    "adapter": adapters.build_bottleneck,
    "ia3": adapters.build_ia3,
    "prompt": prompts.build_prompt,
    "ptuning": prompts.build_ptuning,
    "prefix": prompts.build_prefix,
    "ptuning_v2": prompts.build_prefix,
    "bitfit": select.build_bitfit,
    "freeze": select.build_freeze,
}
EXCLUSIVE = [{"lora", "qlora", "dora"}, {"prompt", "ptuning"}, {"prefix", "ptuning_v2"}, {"full", "freeze"}]


def deep_merge(a: dict, b: dict) -> dict:
    """Nested dicts: b's entries added to a's (a conflict on one leaf is an error, not an override)."""
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = deep_merge(out[k], v)
        elif k in out:
            raise PeftConfigError(f"two methods both define the parameter {k!r}")
        else:
            out[k] = v
    return out


def merge_variables(frozen: dict, trainable: dict) -> dict:
    """The variables `Decoder.apply` takes: frozen and trainable collections deep-merged, encoder-produced
    virtual tokens / prefixes computed (inside the differentiated function, so gradients reach the encoders)."""
    return prompts.materialize(deep_merge(frozen, trainable))


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class Plan:
    frozen: dict  # collections never differentiated: {"params": ..., "quant": ...}
    trainable: dict  # collections the optimiser updates
    spec: PeftSpec
    lr_multipliers: dict  # shaped like `trainable`, python floats
    arch: ArchConfig  # model.arch with `spec` (and its layer split): what Decoder(...) is built from
    model: Model  # the base model this plan adapts (for export: hf_config, tokenizer)
    methods: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        """Trainable vs total parameters and the AdamW state they need (what every run logs)."""
        n_train = _count(self.trainable)
        base = _count(self.frozen.get("params", {})) + _count(self.trainable.get("params", {}))
        qbytes = 0
        if "quant" in self.frozen:
            base += self.arch.num_layers * sum(
                m.in_features * m.out_features for m in quant.quantized_modules(self.arch)
            )
            qbytes = quant.stored_bytes(self.frozen["quant"])
        extra = n_train - _count(self.trainable.get("params", {}))  # adapter parameters (not base params)
        total = base + extra
        adam = 2 * _nbytes(self.trainable)  # AdamW: first and second moments, each like the params
        line = (
            f"method {'+'.join(self.methods)}: trainable params {n_train:,} / {total:,} "
            f"({100 * n_train / max(total, 1):.4f}%); AdamW state {_human(adam)}"
        )
        if qbytes:
            line += (
                f"; frozen base stored as {self.spec.quant}: {quant.bytes_per_param(self.frozen['quant'], self.arch):.4f}"
                f" bytes/param over the quantised kernels ({_human(qbytes)})"
            )
        return line

    def fold(self, trainable: dict) -> dict:
        """Inference-time collections: P-tuning / prefix encoders replaced by the tokens they produce."""
        return prompts.materialize(trainable)

    def adapters(self, trainable: dict) -> Adapters:
        """`Adapters` for `model.logits(..., adapters=)` and `save_adapter`, over the *unsplit* base params of
        `base_model(trainable)` (layer stacks joined, encoders folded, the `quant` collection included for QLoRA).
        PiSSA's factors are re-expressed relative to the original weights (`lora.pissa_to_lora`)."""
        spec = dataclasses.replace(self.spec, layer_split=0)
        folded = self.fold(trainable)
        variables = {k: select.join_layers(v) for k, v in folded.items() if k != "params"}
        if "pissa_initial" in self.info:
            variables["lora"] = lora.pissa_to_lora(variables["lora"], self.info["pissa_initial"])
        if "quant" in self.frozen:
            variables["quant"] = self.frozen["quant"]
        return Adapters(variables=variables, spec=spec)

    def base_model(self, trainable: dict) -> Model:
        """The model with the trained base params put back (full / BitFit / freeze), layer stacks joined; for
        PiSSA the original kernels, not the residuals (`adapters` is relative to them)."""
        params = select.join_layers(deep_merge(self.frozen.get("params", {}), trainable.get("params", {})))
        if "pissa_initial" in self.info:
            for m in names.modules(self.model.arch):
                if lora.has_leaf(self.info["pissa_initial"], m.path):
                    path = (*m.path, "kernel")
                    params = names.set_path(params, path, names.get_path(self.model.params, path))
        return dataclasses.replace(self.model, params=params)


def _check(model: Model, methods: tuple[str, ...], quantization: str) -> None:
    if not model.arch.scan_layers:
        raise PeftConfigError(
            "jaxtune.peft needs the scanned layer layout: load the model with scan_layers=True"
        )
    for m in methods:
        if m not in BUILDERS:
            raise PeftConfigError(f"unknown method {m!r}; methods: {', '.join(BUILDERS)}")
    for group in EXCLUSIVE:
        if len(group & set(methods)) > 1:
            raise PeftConfigError(f"methods {sorted(group & set(methods))} cannot be combined (pick one)")
    if quantization != "none" and "full" in methods:
        raise PeftConfigError(
            "full fine-tuning cannot use a quantised base (quantised weights stay frozen); use qlora"
        )
    if "qlora" in methods and quantization == "none":
        raise PeftConfigError("qlora is LoRA over a quantised base: set model.quantization to nf4 or int8")


def prepare(
    model: Model,
    method_cfg,
    rng,
    quantization: str = "none",
    double_quant: bool = False,
    quant_block_size: int = 64,
    quantized: dict | None = None,
) -> Plan:
    """Build the trainable and frozen pytrees for `method_cfg` (see module docstring).

    `quantized`: the `quant` collection from `jaxtune.peft.quant.load_quantized` when the model was loaded
    straight into quantised form (its params then lack those kernels).
    """
    cfg = method_config(method_cfg)
    methods = methods_of(cfg)
    if quantized is not None and quantization == "none":
        raise PeftConfigError(
            "quantized= was given but quantization='none'; pass the format it was built with"
        )
    _check(model, methods, quantization)
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    params, qvars = model.params, quantized
    arch = model.arch
    if quantization != "none":
        quant.check(quantization, quant_block_size)
        arch = arch.replace(peft=dataclasses.replace(arch.peft, quant=quantization))
        if cfg.pissa:
            # QPiSSA would quantise the residual W - sBA, so its adapter is relative to a base no checkpoint holds
            raise PeftConfigError(
                "PiSSA with a quantised base is not supported (its adapter could not be exported relative to the "
                "original weights): set method.pissa=false or model.quantization=none"
            )
        experts.log_unquantized(arch)
        if qvars is None:
            params, qvars = quant.quantize_params(params, arch, quantization, quant_block_size, double_quant)
    base_for_init = params
    parts: list[Part] = []
    for name, key in zip(methods, jax.random.split(rng, len(methods))):
        part = BUILDERS[name](
            Context(dataclasses.replace(model, arch=arch), cfg, params=base_for_init, rng=key, quant=qvars)
        )
        if part.params is not None and part.params is not base_for_init:  # PiSSA residuals
            base_for_init = params = part.params
        parts.append(part)
    spec_fields: dict = {"quant": quantization}
    for part in parts:
        spec_fields.update(part.spec)
    spec = PeftSpec(**{**dataclasses.asdict(PeftSpec()), **spec_fields})
    split = spec.layer_split
    trainable: dict = {}
    lr: dict = {}
    for part in parts:
        trainable = deep_merge(trainable, part.trainable)
        lr = deep_merge(lr, part.lr)
    if split and "encoder" in trainable.get("prefix", {}):
        raise PeftConfigError("freeze-tuning cannot be combined with prefix_projection; drop one of them")
    trainable = {k: select.split_layers(v, split) for k, v in trainable.items()}
    lr = {k: select.split_layers(v, split) for k, v in lr.items()}
    frozen = {"params": select.split_layers(params, split)}
    if qvars is not None:
        frozen["quant"] = select.split_layers(qvars, split)
    selects = [p.select for p in parts if p.select is not None]
    if selects or cfg.trainable_patterns:
        predicate = select.pattern_predicate(cfg.trainable_patterns, cfg.frozen_patterns, selects)
        chosen, rest = select.partition(frozen["params"], predicate)
        for name, part in zip(methods, parts):
            # a selection method must select something (BitFit on a bias-less model trains only its added biases)
            if name in SELECTION and not part.trainable:
                select.check_nonempty(select.partition(frozen["params"], part.select)[0], f"method {name}")
        if chosen:
            trainable["params"], frozen["params"] = chosen, rest
    multipliers = jax.tree.map(lambda _: 1.0, trainable)
    flat_lr = traverse_util.flatten_dict(lr)
    flat_m = traverse_util.flatten_dict(multipliers)
    flat_m.update({k: v for k, v in flat_lr.items() if k in flat_m})
    info = {k: v for part in parts for k, v in part.info.items()}
    if cfg.pissa:  # the initial factors, to express the trained adapter relative to the original weights
        info["pissa_initial"] = next(p.trainable["lora"] for p in parts if "lora" in p.trainable)
    return Plan(
        frozen=frozen,
        trainable=trainable,
        spec=spec,
        lr_multipliers=traverse_util.unflatten_dict(flat_m),
        arch=with_peft(model.arch, spec),
        model=model,
        methods=methods,
        info=info,
    )
