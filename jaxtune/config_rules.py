"""Config checks beyond one section: which options fit which stage (`check_stage_fit`, run by
`RunConfig.__post_init__`), and `config_error` for the checks made after loading (a target module the model
lacks, a reward model directory that does not load), which names the YAML file and line of the key, or the
command-line override, as the load-time errors do (`typed_yaml.where`). Importing this never imports jax.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jaxtune import typed_yaml
from jaxtune.errors import RunError
from jaxtune.typed_yaml import ConfigError, check


def config_error(cfg: Any, key: str, detail: str, cls: type[Exception] = ConfigError) -> Exception:
    """The error (`cls`, a ConfigError unless given) of a check made after loading: "<key> <detail> (FILE,
    line N)." naming the file and line of `key` (dotted, relative to `cfg`: a RunConfig or one of its
    sections) or the command-line override that set it, as the load-time errors do. `raise` it."""
    detail = detail.rstrip().rstrip(".")
    text = detail if re.match(rf"(\w+\.)*{re.escape(key)}\b", detail) else f"{key} {detail}"
    return cls(f"{text}{typed_yaml.where(cfg, key)}.")


_KEY = re.compile(r"\b(?:model|data|method|training|parallel|logging|generation|dpo|rm|ppo|grpo)\.[a-z_]+\b")


@contextmanager
def locating(cfg: Any) -> Iterator[None]:
    """A `RunError` raised inside about a config key it names (the first dotted key in its text: a batch that
    does not split over the mesh, a mesh larger than the machine, a kernel this backend lacks) comes out with
    the file and line of that key, or its override, appended."""
    try:
        yield
    except RunError as e:
        key = _KEY.search(str(e))
        where = typed_yaml.where(cfg, key.group()) if key else ""
        if not where or where.strip(" ()") in str(e):
            raise
        raise type(e)(f"{str(e).rstrip().rstrip('.')}{where}.") from None


def check_stage_fit(cfg: Any, methods: tuple[str, ...]) -> None:
    """Options of RunConfig `cfg` that another section's value rules out for its stage (`methods`: method.name
    and method.combine); `check` failures, which `typed_yaml.build` locates in the file."""
    stage = cfg.stage
    # the collections of models/adapters_hook.UNMERGEABLE: virtual tokens or extra layers
    extra = [m for m in methods if m in ("prompt", "ptuning", "prefix", "ptuning_v2", "adapter")]
    key = "method.name" if cfg.method.name in extra else "method.combine"
    detail = (
        f"{'+'.join(extra)} does not fit stage rm with training.export_hf=true: a *ForSequenceClassification "
        "model cannot hold these adapters (virtual tokens / extra layers); use lora, qlora, dora, ia3, "
        "bitfit, freeze or full, or set training.export_hf=false"
    )
    check(stage != "rm" or not extra or not cfg.training.export_hf, key, detail)
    kinds = {"rm": "preference pairs", "dpo": "preference pairs", "kto": "labelled completions",
             "ppo": "prompts", "grpo": "prompts"}  # fmt: skip
    detail = f"is for stages pt and sft; stage {stage} keeps whole examples ({kinds.get(stage)}): set it false"
    check(not cfg.data.packing or stage in ("pt", "sft"), "data.packing", detail)
    detail = (
        "cannot go with stage kto: its KL reference point pairs each prompt with another row's completion, "
        "different in every batch; set it to false"
    )
    check(stage != "kto" or not cfg.dpo.precompute_ref_log_probs, "dpo.precompute_ref_log_probs", detail)
    trains_base = [m for m in methods if m in ("full", "bitfit", "freeze")]
    detail = (
        f"is adapters_off, but method {'+'.join(trains_base)} trains base parameters, so the model without "
        "adapters is not the initial model: use dpo.reference=frozen_copy (or auto)"
    )
    off = cfg.dpo.reference == "adapters_off"
    check(stage not in ("dpo", "kto") or not (off and trains_base), "dpo.reference", detail)
