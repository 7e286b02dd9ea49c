"""Where every array of a run lives on the mesh: train state, frozen weights, batches.

Shapes first, then shardings, then values (DESIGN.md "Sharding"). The logical axes of each leaf come from the
model itself, `jax.eval_shape` of `Decoder.init` (`models.model.abstract_variables`), and the one rules table
(`parallel/rules.py`) turns them into `NamedSharding`s:

- `params` (base weights, frozen or trained): the axes the decoder declares for that path;
- adapter collections reuse the names of the weight they adapt (DESIGN.md): LoRA `lora_a [in, r]` gets the
  kernel's input axis and `lora_rank`, `lora_b [r, out]` its output axis, DoRA's `magnitude [out]`, (IA)^3
  `scale_in` / `scale_out` and BitFit `bias` likewise; a QLoRA `quant` leaf with the kernel's rank keeps its
  `[in, out]` layout (peft/quant.py stores codes and scales that way). Every other adapter leaf (bottleneck
  adapters, prompts, prefixes, their encoders) is small and replicated;
- optimiser state: each leaf shaped like its parameter (Adam's moments, ...) shards like the parameter, anything
  else (step counts, Adafactor's factored row / column statistics) is replicated;
- `step` and `rng` are replicated; a batch is split along its leading dim, `batch -> (data, fsdp)`.

`place` (jaxtune.parallel) puts existing arrays into those shardings; `state.create(..., shardings=)` builds the optimiser state
directly in its shards, and `models.hf.load_model(..., mesh=)` / `from_hf_config(..., mesh=)` load or create
the base weights straight into theirs, so no process ever holds a full unsharded copy on one device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import RunError
from jaxtune.models.model import abstract_variables
from jaxtune.parallel.distributed import host_local_to_global, process_batch_slice
from jaxtune.parallel.rules import logical_to_mesh_spec, tree_shardings
from jaxtune.train.state import TrainState
from jaxtune.treepath import path_keys

log = logging.getLogger("jaxtune.train")
LARGE_REPLICATED = 2**20  # elements: a replicated leaf this big costs real memory on every device, so warn

# (collection, leaf name) -> its dims in terms of the adapted weight's (input axis, output axis); "r" = rank.
ADAPTER_AXES = {
    ("lora", "lora_a"): ("in", "lora_rank"),
    ("lora", "lora_b"): ("lora_rank", "out"),
    ("lora", "magnitude"): ("out",),
    ("ia3", "scale_out"): ("out",),
    ("ia3", "scale_in"): ("in",),
    ("bitfit", "bias"): ("out",),
}


def base_logical_axes(arch) -> dict[tuple[str, ...], tuple]:
    """{param path: logical axes} for every base parameter of `arch` (layer splits included), from the model."""
    specs = nn.get_partition_spec(abstract_variables(arch.replace(scan_layers=True)))["params"]
    flat = traverse_util.flatten_dict(specs)
    return {k: tuple(v) if v is not None else () for k, v in flat.items()}


def _adapter_axes(collection: str, name: str, ndim: int, weight: tuple | None) -> tuple:
    replicated = (None,) * ndim
    if weight is None or len(weight) < 2:
        return replicated
    *lead, w_in, w_out = weight
    dims = ADAPTER_AXES.get((collection, name))
    if dims is None and collection == "quant" and ndim == len(weight):
        dims = ("in", "out")  # codes / block scales keep the kernel's [in, out] layout
    if dims is None or len(lead) + len(dims) != ndim:
        return replicated
    return (*lead, *({"in": w_in, "out": w_out}.get(d, d) for d in dims))


def logical_axes(collections: dict, arch) -> dict:
    """Tree shaped like `collections` ({"params": ..., "lora": ...}) of logical `PartitionSpec`s (see module doc).

    A leaf at a base parameter's path takes that parameter's axes in any collection (`params`, or a method's
    frozen copy of the base such as DPO's `reference`). A leaf the model does not declare (e.g. a reward
    model's `score` head) is replicated; one log line lists those, a warning when one is large.
    """
    base = base_logical_axes(arch)
    unknown: list[tuple[str, int]] = []

    def one(path, leaf):
        keys = path_keys(path)
        collection, rest = keys[0], keys[1:]
        if rest in base and len(base[rest]) == np.ndim(leaf):
            return PartitionSpec(*base[rest])
        module, name = rest[:-1], rest[-1]
        # the adapted weight: a module's kernel / embedding, or a bare parameter (MoE experts' gate_up_proj)
        weight = base.get((*module, "kernel"), base.get((*module, "embedding"), base.get(module)))
        if weight is None and collection in ("params", "reference"):
            unknown.append(("/".join(keys), int(np.prod(np.shape(leaf)))))
        return PartitionSpec(*_adapter_axes(collection, name, np.ndim(leaf), weight))

    out = jax.tree_util.tree_map_with_path(one, collections)
    if unknown:
        large = [p for p, n in unknown if n >= LARGE_REPLICATED]
        (log.warning if large else log.info)(
            "replicated on every device (the model declares no logical axes for them): %s",
            ", ".join(p for p, _ in unknown),
        )
    return out


def collection_shardings(collections: dict, arch, mesh: Mesh) -> dict:
    """`NamedSharding` for every leaf of a collections dict (arrays or `ShapeDtypeStruct`s)."""
    return tree_shardings(collections, logical_axes(collections, arch), mesh)


def opt_state_shardings(optimizer, abstract_opt_state, trainable, trainable_shardings, mesh: Mesh):
    """Optimiser leaves shaped like their parameter take its sharding; every other leaf is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(leaf, sharding, param):
        return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

    return optax.tree_utils.tree_map_params(
        optimizer,
        one,
        abstract_opt_state,
        trainable_shardings,
        trainable,
        transform_non_params=lambda _: replicated,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over `batch -> (data, fsdp)`; a prefix for every leaf of any batch pytree."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",), mesh=mesh))


@dataclass(frozen=True)
class RunShardings:
    """Everything `make_train_step` / `make_eval_step` need to jit with explicit in/out shardings."""

    mesh: Mesh
    state: TrainState  # a TrainState of NamedShardings
    frozen: dict
    batch: NamedSharding

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def run_shardings(mesh: Mesh, arch, trainable: dict, frozen: dict, optimizer) -> RunShardings:
    """Shardings of a run's state and frozen weights; `trainable` / `frozen` may be arrays or abstract shapes."""
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    trainable, frozen = abstract(trainable), abstract(frozen)
    trainable_sh = collection_shardings(trainable, arch, mesh)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(
        step=replicated,
        trainable=trainable_sh,
        opt_state=opt_state_shardings(optimizer, opt_state, trainable, trainable_sh, mesh),
        rng=replicated,
    )
    return RunShardings(mesh, state, collection_shardings(frozen, arch, mesh), batch_sharding(mesh))


def global_batch(batch: Any, mesh: Mesh) -> Any:
    """A host batch (every process builds the same global batch) -> global arrays split `batch -> (data, fsdp)`.

    Each process hands jax only its own rows (`process_batch_slice`), so host-to-device traffic is this host's
    slice; with one process it is the whole batch.
    """
    rows = jax.tree.leaves(batch)[0].shape[0]
    start, stop = process_batch_slice(rows, mesh)
    return host_local_to_global(jax.tree.map(lambda x: np.asarray(x)[start:stop], batch), mesh)


def bytes_per_device(shardings: Any, tree: Any) -> int:
    """Bytes one device holds of `tree` placed with `shardings` (the largest shard of each leaf)."""
    total = 0
    for sharding, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(tree)):
        total += int(np.prod(sharding.shard_shape(np.shape(leaf)))) * np.dtype(leaf.dtype).itemsize
    return total


def to_host(tree: Any) -> Any:
    """The whole of each array, on every process (a collective with several processes: all must call it)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def check_batch_size(size: int, mesh: Mesh, field: str) -> None:
    """A global batch must split evenly over the batch-parallel devices (data × fsdp); say which field to fix."""
    spec = logical_to_mesh_spec(("batch",), mesh=mesh)
    axes = spec[0] if spec and spec[0] is not None else ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if size % ways:
        raise RunError(
            f"{field}={size} does not split over the {ways} batch-parallel devices of the mesh "
            f"({' × '.join(f'{a}={mesh.shape[a]}' for a in axes)}): make it a multiple of {ways}, or change "
            "parallel.data / parallel.fsdp."
        )
