"""Hugging Face directories in and out: config.json + safetensors <-> `Model`, without torch.

Loading streams one tensor at a time from memory-mapped safetensors straight into each parameter's sharding
(`jax.make_array_from_callback` asks only for the slices the local devices hold), so the host never holds two
full copies of the model. Export writes config.json, sharded safetensors with an index, and the tokenizer, in the
layout `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxtune.errors import JaxtuneError, RunError
from jaxtune.models.arch import DTYPES, ArchConfig
from jaxtune.models.families import (
    IGNORED_SUFFIXES,
    TensorMap,
    UnsupportedModelError,
    arch_from_hf,
    language_model_config,
    supported,
    tensor_maps,
)
from jaxtune.models.family_moe import checkpoint_maps
from jaxtune.models.model import Model, abstract_variables, init_params, param_shardings
from jaxtune.models.safetensors_io import CheckpointError, Lazy, SafetensorsReader, write_sharded
from jaxtune.models.score import SCORE_MAP, is_seq_cls, swap_head

log = logging.getLogger(__name__)


# Where a multimodal checkpoint (Gemma 3) keeps its language model: (the prefix that replaces `model.`, the one
# that replaces `lm_head.`). transformers writes language_model.model.* (4.5x and 5.x alike); its in-memory
# names since 4.52, which other tools may save, are model.language_model.*. The vision tensors are not loaded.
LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "language_model.lm_head."), ("model.language_model.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def read_json(path: Path, error: type[Exception] = CheckpointError) -> object:
    """A JSON file, or `error` naming the file and the line and column where it stops being JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a JSON file?") from None


def read_hf_config(directory: str | Path) -> dict:
    """config.json as jaxtune sees it: a multimodal Gemma 3's is its language model's (`language_model_config`)."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        what = "a file" if Path(directory).exists() else "no such directory"
        raise CheckpointError(f"{directory}: {what} (expected a Hugging Face model directory)")
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json — is this a Hugging Face model directory?")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: must hold a JSON object (HF config keys), got a {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type"), str):
        raise CheckpointError(
            f"{path}: no \"model_type\" (a string such as \"llama\"); jaxtune supports: {', '.join(supported())}"
        )
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: \"architectures\" must be a list of class names, got {archs!r}")
    if cfg["model_type"] == "gemma3" and not isinstance(cfg.get("text_config", {}), dict):
        raise CheckpointError(f"{path}: a gemma3 config's \"text_config\" must be an object")
    return language_model_config(cfg)


# config.json sizes: when present (and not null), positive integers
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
             "n_positions", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")  # fmt: skip


def arch_of(directory, hf_config: dict, source: str | None = None, **runtime) -> ArchConfig:
    """`arch_from_hf` of a model directory's config.json: what it cannot build from is an error naming the file
    (an unsupported model_type or setting, a missing key, a value of the wrong type); `source`: what the errors
    name instead of the file (`random_init` for HF config keys given in code or a run config)."""
    path = source or Path(directory) / "config.json"
    for key in SIZE_KEYS:
        value = hf_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    rope = hf_config.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object (or null), got {rope!r}")
    try:
        return arch_from_hf(hf_config, **runtime)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    except KeyError as e:
        raise CheckpointError(
            f"{path}: no {e.args[0]!r}, which a {hf_config.get('model_type')} config must give"
        ) from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, IndexError) as e:
        if isinstance(e, JaxtuneError):
            raise type(e)(f"{path}: {e}") from None
        raise CheckpointError(f"{path}: a value jaxtune cannot use ({type(e).__name__}: {e})") from None


def _relocate(reader: SafetensorsReader, maps: dict) -> tuple[dict, bool]:
    """The tensor maps renamed to where this checkpoint keeps them: as written, or under a multimodal checkpoint's
    language-model prefix (then True)."""
    embed = maps[("embed_tokens", "embedding")].hf
    if embed in reader or not embed.startswith("model."):
        return maps, False
    for body, head in LANGUAGE_MODEL_PREFIXES:
        if body + embed[len("model.") :] in reader:
            renames = (("model.", body), ("lm_head.", head))
            return {p: _renamed(m, renames) for p, m in maps.items()}, True
    return maps, False


def _renamed(m: TensorMap, renames) -> TensorMap:
    for old, new in renames:
        if m.hf.startswith(old):
            return dataclasses.replace(m, hf=new + m.hf[len(old) :])
    return m


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(directory: str | Path):
    """`transformers.AutoTokenizer` on the same directory, or None when it holds no tokenizer files; files that
    do not load are a `CheckpointError` naming the directory (and the file, with line and column, for JSON)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such directory (expected a tokenizer or model directory)")
    if not any((d / f).exists() for f in TOKENIZER_FILES):
        return None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (d / name).exists() and not isinstance(read_json(d / name), dict):
            raise CheckpointError(f"{d / name}: must hold a JSON object")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # transformers / tokenizers raise many kinds; every one means these files are unusable
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        files = ", ".join(f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if (d / f).exists())
        raise CheckpointError(
            f"{d}: the tokenizer files there ({files}) do not load ({type(e).__name__}: {detail[:300]}); "
            "re-download or re-save them, or set model.tokenizer to another directory"
        ) from None


def _part(t: np.ndarray, m: TensorMap) -> np.ndarray:
    if m.part is not None:
        idx, n = m.part
        size = t.shape[-1] // n
        t = t[..., idx * size : (idx + 1) * size]
    return np.swapaxes(t, -1, -2) if m.transpose else t


def _layer_tensor(reader: SafetensorsReader, m: TensorMap, i: int | None, index: tuple) -> np.ndarray:
    """The slice `index` of one layer's (or a root) leaf, in our layout; expert leaves are assembled from
    their per-expert (and concatenated) tensors, reading only the experts the slice covers."""
    if not m.experts:
        return _part(reader.get(m.hf.format(i=i)), m)[index]
    pieces = (m.hf, *m.concat)
    rest = index[1:]
    return np.stack(
        [
            np.concatenate([_part(reader.get(p.format(i=i, e=e)), m) for p in pieces], axis=-1)[rest]
            for e in range(m.experts)[index[0]]
        ]
    )


def _check(reader: SafetensorsReader, maps: list[TensorMap], shapes: dict, n_layers: int) -> None:
    """Every tensor present with the right shape, or one error listing what is wrong and where."""
    problems = []
    for m in maps:
        want = shapes[m.path][1:] if m.per_layer else shapes[m.path]
        if m.experts:  # one tensor per expert and piece: [.., out / pieces] of the leaf without its expert axis
            want = (*want[1:-1], want[-1] // (1 + len(m.concat)))
        for i in range(n_layers) if m.per_layer else [None]:
            for name in m.names(i):
                if name not in reader:
                    problems.append(f"missing tensor {name}")
                    continue
                got = tuple(reader.shape(name))
                if m.part:
                    got = (*got[:-1], got[-1] // m.part[1])
                got = (*got[:-2], got[-1], got[-2]) if m.transpose else got
                if tuple(got) != tuple(want):
                    hf_want = (*want[:-2], want[-1], want[-2]) if m.transpose else tuple(want)  # as HF stores it
                    if m.part:
                        hf_want = (*hf_want[:-1], hf_want[-1] * m.part[1])
                    problems.append(
                        f"tensor {name} has shape {reader.shape(name)}, config.json implies {hf_want} "
                        f"(in {reader.file_of(name).name})"
                    )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            f"{reader.dir}: checkpoint does not match its config.json: {'; '.join(problems[:5])}{more}"
        )


def load_params(directory, arch: ArchConfig, shardings=None, head: str = "lm"):
    """Params pytree (stacked layers) from safetensors; each leaf built straight into its sharding, if given.

    `head="score"`: a `*ForSequenceClassification` checkpoint (reward model): `score` instead of `lm_head`."""
    reader = SafetensorsReader(directory)
    stacked = arch.replace(scan_layers=True)
    abstract = traverse_util.flatten_dict(abstract_variables(stacked)["params"])
    shapes = {k: tuple(v.value.shape if hasattr(v, "value") else v.shape) for k, v in abstract.items()}
    maps = {m.path: m for m in checkpoint_maps(arch, tensor_maps(arch), reader)}  # MoE: legacy or fused
    if head == "score":
        if "score.weight" not in reader:
            raise CheckpointError(
                f"{directory}: config.json names a *ForSequenceClassification model but holds no score.weight"
            )
        maps, shapes = swap_head(maps, shapes, reader.shape("score.weight"))
    maps, multimodal = _relocate(reader, maps)
    _check(reader, list(maps.values()), shapes, arch.num_layers)
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    dtype = DTYPES[arch.param_dtype]
    used, out = set(), {}
    for path, shape in shapes.items():
        m = maps[path]

        def read(index, m=m):  # the slice `index` of this leaf, in our layout
            if not m.per_layer:
                return np.asarray(_layer_tensor(reader, m, None, index), dtype=dtype)
            layers = range(arch.num_layers)[index[0]]
            return np.stack([np.asarray(_layer_tensor(reader, m, i, index[1:]), dtype=dtype) for i in layers])

        for i in range(arch.num_layers) if m.per_layer else [None]:
            used.update(m.names(i))
        sharding = flat_shardings.get(path)
        if sharding is None:
            out[path] = jax.device_put(read(tuple(slice(None) for _ in shape)))
        else:
            out[path] = jax.make_array_from_callback(shape, sharding, read)
    unused = [n for n in reader.names() if reader.resolve(n) not in {reader.resolve(u) for u in used}]
    tied_heads = {"lm_head.weight", *(head + "weight" for _, head in LANGUAGE_MODEL_PREFIXES)}
    unused = [n for n in unused if not n.endswith(IGNORED_SUFFIXES) and n not in tied_heads]
    if multimodal:
        vision = [n for n in unused if n.startswith(VISION_PREFIXES)]
        unused = [n for n in unused if not n.startswith(VISION_PREFIXES)]
        log.info("%s: language model loaded from %s*, %d vision tensors not loaded", directory,
                 maps[("embed_tokens", "embedding")].hf.split("embed_tokens")[0], len(vision))  # fmt: skip
    if unused:
        log.warning("%s: %d checkpoint tensors unused, e.g. %s", directory, len(unused), unused[:3])
    params = traverse_util.unflatten_dict(out)
    return params if arch.scan_layers else unstack_layers(params, arch.num_layers)


def load_model(
    path, dtype="float32", param_dtype="float32", shardings=None, tokenizer=True, mesh=None, **runtime
) -> Model:
    """`jaxtune.load_model`: a local HF directory -> Model (params in `param_dtype`, compute in `dtype`).

    `mesh`: load every tensor straight into its shards on that mesh (`parallel/rules.py`), unless `shardings`
    (a stacked-layout params tree of `NamedSharding`s) says otherwise."""
    cfg = read_hf_config(path)
    arch = arch_of(path, cfg, dtype=dtype, param_dtype=param_dtype, **runtime)
    if shardings is None and mesh is not None:
        shardings = param_shardings(arch.replace(scan_layers=True), mesh)
    params = load_params(path, arch, shardings, head="score" if is_seq_cls(cfg) else "lm")
    tok = load_tokenizer(path) if tokenizer else None
    return Model(arch=arch, params=params, tokenizer=tok, hf_config=cfg, path=str(path))


def random_init_config(hf_config: dict) -> dict:
    """HF config keys (`model.random_init`) completed with transformers' defaults for their model_type."""
    kwargs = dict(hf_config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("random_init needs a `model_type` (e.g. llama, qwen2, gpt2)")
    if model_type not in supported():
        raise UnsupportedModelError(
            f"random_init: model_type {model_type!r} is not supported; jaxtune supports: {', '.join(supported())}"
        )
    from transformers import AutoConfig  # after the checks: importing it takes seconds

    try:
        return language_model_config(AutoConfig.for_model(model_type, **kwargs).to_dict())
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"random_init: transformers rejects these {model_type} keys ({e})") from None


def from_hf_config(hf_config: dict, rng=0, tokenizer=None, mesh=None, **runtime) -> Model:
    """A randomly initialised model from HF config keys (e.g. {"model_type": "llama", "hidden_size": 64, ...}).

    `mesh`: every parameter is created in its shards on that mesh (the values do not depend on the mesh)."""
    full = random_init_config(hf_config)
    arch = arch_of(None, full, "random_init", **runtime)
    shardings = None if mesh is None else param_shardings(arch, mesh)
    return Model(arch=arch, params=init_params(arch, rng, shardings), tokenizer=tokenizer, hf_config=full)


def stack_layers(params: dict, n_layers: int) -> dict:
    """{"layers_0": t0, "layers_1": t1, ...} -> {"layers": stacked} (the scanned layout)."""
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not re.fullmatch(r"layers_\d+", k)}
    return {**rest, "layers": jax.tree.map(lambda *xs: jax.numpy.stack(xs), *layers)}


def unstack_layers(params: dict, n_layers: int) -> dict:
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {
        **rest,
        **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n_layers)},
    }


def hf_tensors(params: dict, arch: ArchConfig, dtype) -> list[Lazy]:
    """Lazy HF tensors from our params, fused parts (GPT-2 c_attn) concatenated back."""
    if not arch.scan_layers:
        params = stack_layers(params, arch.num_layers)
    flat = traverse_util.flatten_dict(params)
    groups: dict[str, list[TensorMap]] = {}
    maps = tensor_maps(arch)
    if "score" in params:  # a reward / value model: HF *ForSequenceClassification has `score`, no LM head
        maps = [m for m in maps if m.path[0] != "lm_head"] + [SCORE_MAP]
    out = []
    for m in maps:
        if m.experts:  # MoE: one tensor per expert and piece (family_moe.py), the legacy layout HF saves
            out += expert_tensors(flat[m.path], m, arch.num_layers, dtype)
        else:
            groups.setdefault(m.hf, []).append(m)
    for hf, ms in groups.items():
        ms = sorted(ms, key=lambda m: m.part or (0, 1))
        for i in range(arch.num_layers) if ms[0].per_layer else [None]:

            def fn(ms=ms, i=i):
                parts = [
                    np.asarray(jax.device_get(flat[m.path] if i is None else flat[m.path][i])) for m in ms
                ]
                t = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
                return np.swapaxes(t, -1, -2) if ms[0].transpose else t

            leaf = flat[ms[0].path]
            shape = leaf.shape[1:] if i is not None else leaf.shape
            if len(ms) > 1:
                shape = (*shape[:-1], shape[-1] * len(ms))
            shape = (*shape[:-2], shape[-1], shape[-2]) if ms[0].transpose else shape
            out.append(Lazy(hf.format(i=i), shape, dtype, fn))
    return out


def expert_tensors(leaf, m: TensorMap, n_layers: int, dtype) -> list[Lazy]:
    """Lazy per-expert HF tensors of a stacked [L, E, ..., pieces * out] expert leaf."""
    pieces = (m.hf, *m.concat)
    size = leaf.shape[-1] // len(pieces)
    out = []
    for i in range(n_layers):
        for e in range(m.experts):
            for j, name in enumerate(pieces):

                def fn(i=i, e=e, j=j):
                    t = np.asarray(jax.device_get(leaf[i, e, ..., j * size : (j + 1) * size]))
                    return np.swapaxes(t, -1, -2) if m.transpose else t

                shape = (*leaf.shape[2:-1], size)
                shape = (*shape[:-2], shape[-1], shape[-2]) if m.transpose else shape
                out.append(Lazy(name.format(i=i, e=e), shape, dtype, fn))
    return out


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise RunError(f"max_shard_size {size!r}: expected e.g. '5GB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


def save_model(model: Model, out_dir, max_shard_size: str | int = "5GB", dtype: str | None = None) -> Path:
    """`jaxtune.save_model`: write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.arch.param_dtype
    cfg = dict(model.hf_config)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()  # a previous export with another shard count must not be mixed into this one
    write_sharded(out, hf_tensors(model.params, model.arch, DTYPES[dtype]), parse_size(max_shard_size))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out
