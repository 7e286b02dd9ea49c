"""Everything a run needs before its first step: run directory records, the model, builtin demo assets."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

from jaxtune.config import dump_yaml
from jaxtune.config_rules import config_error, locating
from jaxtune.errors import MissingError, RunError
from jaxtune.train import status

log = logging.getLogger("jaxtune.train")


def git_hash() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record_run(cfg, run_dir: Path) -> None:
    """The resolved config, library versions and the jaxtune commit, so a run can be reproduced."""
    import flax
    import jax
    import optax
    import orbax.checkpoint
    import transformers

    dump_yaml(cfg, run_dir / "config.yaml")
    info = {
        "argv": sys.argv,
        "python": platform.python_version(),
        "jaxtune_git": git_hash(),
        "versions": {m.__name__: getattr(m, "__version__", "?") for m in (jax, flax, optax, orbax.checkpoint, transformers)},
        "devices": [str(d) for d in jax.devices()],
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def setup_logging(run_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("jaxtune")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_jaxtune", False):
            root.removeHandler(h)
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        handler._jaxtune = True
        root.addHandler(handler)
    root.propagate = False


def resolve_builtins(cfg, run_dir: Path):
    """`builtin:demo` data -> generated demo files in the run dir (train + eval)."""
    train = list(cfg.data.train)
    if "builtin:demo" not in train:
        return cfg
    from jaxtune import demo

    train_file, eval_file = demo.write_dataset(run_dir / "data", seed=cfg.seed)
    train = [str(train_file) if s == "builtin:demo" else s for s in train]
    evals = tuple(cfg.data.eval) or (str(eval_file),)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=tuple(train), eval=evals))


def start_run(cfg):
    """The run directory, logging to it, builtin data resolved, and (process 0) the run record and its
    status.json ("running"): -> (cfg with builtins resolved, run_dir, is_main_process)."""
    import jax

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        status.begin(run_dir)
    setup_logging(run_dir)
    cfg = resolve_builtins(cfg, run_dir)
    if main:
        record_run(cfg, run_dir)
    return cfg, run_dir, main


def load_tokenizer(cfg):
    name = cfg.model.tokenizer
    if name == "builtin:chars":
        from jaxtune import demo

        return demo.char_tokenizer()
    if name and Path(name).is_dir():  # a local directory: its files checked, errors naming it and the key
        from jaxtune.models import hf

        with _located(cfg, "model.tokenizer"):
            tokenizer = hf.load_tokenizer(name)
        if tokenizer is None:
            raise config_error(cfg, "model.tokenizer", f"model.tokenizer={name}: no tokenizer files there (one of "
                               f"{', '.join(hf.TOKENIZER_FILES)})", MissingError)  # fmt: skip
        return tokenizer
    if name:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:  # no such directory / no tokenizer files there (nothing is downloaded)
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise config_error(cfg, "model.tokenizer", f"model.tokenizer {name!r}: no tokenizer loads from it "
                               f"({detail})", MissingError) from None  # fmt: skip
    return None


@contextlib.contextmanager
def _located(cfg, key: str):
    """A model-directory or model-config error (it names the directory or file) raised inside, also naming `key`
    and its line; other errors (a mesh that does not fit the model, ...) pass unchanged."""
    from jaxtune.models import CheckpointError, UnsupportedModelError

    try:
        yield
    except (CheckpointError, UnsupportedModelError) as e:
        value = getattr(cfg.model, key.split(".")[-1])
        shown = f"{key}={value}: " if isinstance(value, str) else ""  # a path, not the random_init mapping
        text = f"{shown}{e}"
        text = f"model.{text}" if text.startswith("random_init") else text  # hf words it for its own API
        raise config_error(cfg, key, text, type(e)) from None


# Set (to 1) by tests that run the Pallas kernels through the interpreter on a CPU: a run may then name one.
PALLAS_INTERPRET_ENV = "JAXTUNE_PALLAS_INTERPRET"
_NEEDS = {"cudnn": "an NVIDIA GPU with cuDNN", "pallas_gpu": "a GPU (Pallas Triton kernel)",
          "splash": "a TPU (Pallas splash attention)"}  # fmt: skip


def check_attention_impl(impl: str) -> str:
    """The implementation a run uses (`auto` resolved by backend, logged once), or a RunError before anything
    is traced when the named one needs another platform."""
    import os

    import jax

    from jaxtune.models import attention

    resolved = attention.resolve(impl)
    backend = jax.default_backend()
    native = resolved == "xla" or attention.PLATFORM[resolved] == backend
    if not native and os.environ.get(PALLAS_INTERPRET_ENV) != "1":
        raise RunError(
            f"model.attention_impl={impl} needs {_NEEDS[resolved]}, but JAX's backend here is "
            f"{backend!r}: set model.attention_impl=xla on this machine."
        )
    log.info("attention: %s%s (JAX backend %s)", "auto -> " if impl == "auto" else "", resolved, backend)
    return resolved


def _runtime(cfg, impl=None) -> dict:
    m = cfg.model
    blocks = (m.attention_block_q, m.attention_block_kv, m.attention_block_q_bwd, m.attention_block_kv_bwd)
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=impl or m.attention_impl, remat=m.remat,
                scan_layers=m.scan_layers, attention_blocks=blocks)  # fmt: skip


def _random_init(cfg, tokenizer) -> dict:
    """`model.random_init` with the vocabulary of the configured tokenizer unless it names one."""
    init = dict(cfg.model.random_init)
    if tokenizer is not None and "vocab_size" not in init:
        init["vocab_size"] = len(tokenizer)
    return init


def _no_model() -> RunError:
    return RunError("model: give `model.path` (a local Hugging Face directory) or `model.random_init`")


def build_model(cfg, mesh=None):
    """The base model from `model.path` (HF directory) or `model.random_init` (HF config keys); with `mesh`,
    every parameter is loaded / created straight into its shards."""
    from jaxtune.models import hf

    m = cfg.model
    with locating(cfg):  # the key's line in the YAML file
        impl = check_attention_impl(m.attention_impl)
    tokenizer = load_tokenizer(cfg)
    if m.path:
        with _located(cfg, "model.path"):
            model = hf.load_model(m.path, tokenizer=tokenizer is None, mesh=mesh, **_runtime(cfg, impl))
        if tokenizer is not None:
            model.tokenizer = tokenizer
    elif m.random_init:
        with _located(cfg, "model.random_init"):
            model = hf.from_hf_config(_random_init(cfg, tokenizer), rng=cfg.seed, tokenizer=tokenizer, mesh=mesh,
                                      **_runtime(cfg, impl))  # fmt: skip
    else:
        raise _no_model()
    if model.tokenizer is None:
        where = f"{m.path} holds no tokenizer files (one of {', '.join(hf.TOKENIZER_FILES)})" if m.path else (
            "random_init has no tokenizer")
        raise config_error(cfg, "model.tokenizer", f"is not set and {where}; set model.tokenizer", RunError)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        # keep the exported config's special ids in step with the tokenizer the model was trained with
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                model.hf_config[key] = value
    return model


def abstract_model(cfg):
    """`build_model` as shapes only: the architecture from config.json / `model.random_init` (with the
    tokenizer's vocabulary, as training has it), parameters as `ShapeDtypeStruct`s; no weight is read.
    Traced with XLA's attention where the configured kernel's platform is absent (shapes do not depend on it)."""
    import jax

    from jaxtune.models import attention, hf
    from jaxtune.models.model import Model, init_params

    m = cfg.model
    impl = attention.resolve(m.attention_impl)
    impl = impl if impl == "xla" or attention.PLATFORM[impl] == jax.default_backend() else "xla"
    tokenizer = load_tokenizer(cfg)
    if m.path:
        with _located(cfg, "model.path"):
            hf_config = hf.read_hf_config(m.path)
            arch = hf.arch_of(m.path, hf_config, **_runtime(cfg, impl))
        if tokenizer is None:
            try:
                tokenizer = hf.load_tokenizer(m.path)
            except Exception:  # shapes need no tokenizer; a missing one is training's error to report
                tokenizer = None
    elif m.random_init:
        with _located(cfg, "model.random_init"):
            hf_config = hf.random_init_config(_random_init(cfg, tokenizer))
            arch = hf.arch_of(None, hf_config, "random_init", **_runtime(cfg, impl))
    else:
        raise _no_model()
    params = jax.eval_shape(lambda: init_params(arch, 0))
    return Model(arch=arch, params=params, tokenizer=tokenizer, hf_config=hf_config, path=m.path)
