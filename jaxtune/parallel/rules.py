"""Logical axis names, the one logical -> mesh table, and the shardings derived from it.

Every parameter, adapter, optimiser leaf, batch and activation in jaxtune names its dimensions with *logical*
axes (`embed`, `mlp`, `heads`, ...; the models attach them with `flax.linen.with_logical_partitioning`). `RULES`
below is the only place that says which *mesh* axis each logical axis is split over. Changing the parallelism
strategy means editing that table and the mesh shape, never the model (the MaxText / Flax lm1b pattern; see
DESIGN.md "Sharding").

Resolution of one array's logical axes to a `PartitionSpec` follows Flax's rule semantics
(`flax.linen.logical_to_mesh_axes`): rules are taken in table order, and a mesh axis is used at most once per
array. That is why `batch` comes first: an activation `(batch, length, embed)` gets `batch -> (data, fsdp)` and
`embed` stays unsharded, while a parameter `(embed, mlp)` gets `embed -> fsdp` (FSDP: parameters are split
along `embed`, activations along `batch`).

Two refinements on top of Flax, both needed to use one table on any mesh:
- a mesh axis of size 1 is dropped (it splits nothing; leaving it out keeps specs and snapshots readable);
- with a shape, a mesh axis that does not divide the dimension is dropped and the dimension falls back to
  replication along that axis (e.g. a 32001-row vocabulary on tensor=8). The reason is recorded as a note
  (`explain_spec`, `sharding_snapshot`) and `tree_shardings` logs one warning listing them, because a
  replicated embedding can cost a lot of memory.
A mesh axis freed by such a drop is not handed to another dimension: layouts stay predictable from the table.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import RunError
from jaxtune.treepath import path_str

log = logging.getLogger(__name__)

# Mesh axis names: outermost (slowest interconnect) first, the order of `make_mesh`'s device array.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
LogicalAxes = Sequence[str | None]

# THE table. Order matters (earlier rules claim mesh axes first; see the module docstring).
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", (DATA, FSDP)),  # data parallelism over both axes: FSDP is data parallel for activations
    # expert parallelism: MoE expert weights split by expert over fsdp (before `embed` claims it, so an expert
    # kernel [E, D, F] is split by expert, not by width); the tokens, split over fsdp as the batch, meet their
    # experts through the all-gather / reduce-scatter exchange of models/experts.py
    ("expert", FSDP),
    ("embed", FSDP),  # FSDP: parameters split along the model width
    ("mlp", TENSOR),  # tensor parallelism (Megatron): MLP hidden, attention heads, vocabulary
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("vocab", TENSOR),
    ("head_dim", None),
    ("expert_mlp", None),  # an expert's hidden dim (fused gate | up): experts are split by expert instead
    ("layers", None),  # the nn.scan axis over decoder blocks
    ("lora_rank", None),  # small; LoRA factors shard along the kernel dim they share (embed / mlp / heads)
    ("length", None),
    ("norm", None),  # norm scales and biases: tiny, replicated
    ("adapter", None),  # bottleneck adapter hidden size (Houlsby / Pfeiffer)
    ("virtual_tokens", None),  # prompt / prefix tuning tokens
)
LOGICAL_AXES = tuple(name for name, _ in RULES)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _check_names(logical_axes: LogicalAxes, rules: Rules) -> None:
    known = [name for name, _ in rules]
    for name in logical_axes:
        if name is not None and name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RunError(
                f"Unknown logical axis {name!r} in {tuple(logical_axes)}.{hint} Known logical axes: "
                f"{', '.join(known)}. Add a rule to jaxtune/parallel/rules.py RULES if it is a new kind of dim."
            )
    named = [n for n in logical_axes if n is not None]
    dups = sorted({n for n in named if named.count(n) > 1})
    if dups:
        raise RunError(
            f"Logical axes {tuple(logical_axes)} name {dups} more than once; a mesh axis can split only one "
            "dimension of an array, so give each dimension its own logical name."
        )


def explain_spec(
    logical_axes: LogicalAxes,
    mesh: Mesh | Any | None = None,
    shape: Sequence[int] | None = None,
    rules: Rules = RULES,
) -> tuple[PartitionSpec, tuple[str, ...]]:
    """The mesh `PartitionSpec` for an array with these logical axes, and notes on every fallback.

    `mesh` (a `Mesh` or `AbstractMesh`; only its axis sizes are read) enables dropping size-1 and missing mesh
    axes; `shape` additionally enables dropping mesh axes that do not divide their dimension. Notes explain each
    drop except the routine size-1 one.
    """
    logical_axes = tuple(logical_axes)
    _check_names(logical_axes, rules)
    if shape is not None and len(logical_axes) > len(shape):
        raise RunError(
            f"Logical axes {logical_axes} name {len(logical_axes)} dims but the shape is {shape}."
        )
    # Flax semantics: walk the rules in order; a rule applies if its logical name is present, that dim is still
    # unassigned and none of its mesh axes is taken yet.
    assigned: dict[int, tuple[str, ...]] = {}
    taken: set[str] = set()
    for name, mesh_axes in rules:
        if name not in logical_axes:
            continue
        dim = logical_axes.index(name)
        axes = _as_tuple(mesh_axes)
        if dim in assigned or taken.intersection(axes):
            continue
        assigned[dim] = axes
        taken.update(axes)

    sizes = dict(mesh.shape) if mesh is not None else None
    notes: list[str] = []
    entries: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        kept: list[str] = []
        for axis in assigned.get(dim, ()):
            if sizes is None:
                kept.append(axis)
                continue
            if axis not in sizes:
                notes.append(f"dim {dim} ({name}): mesh has no axis {axis!r}; not split along it")
                continue
            if sizes[axis] == 1:
                continue
            factor = math.prod(sizes[a] for a in kept) * sizes[axis]
            if shape is not None and shape[dim] % factor:
                notes.append(
                    f"dim {dim} ({name}={shape[dim]}) is not divisible by {'×'.join([*kept, axis])}={factor}; "
                    f"replicated along {axis!r}"
                )
                continue
            kept.append(axis)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries), tuple(notes)


def logical_to_mesh_spec(
    logical_axes: LogicalAxes, rules: Rules = RULES, mesh: Mesh | Any | None = None
) -> PartitionSpec:
    """Logical axes -> mesh `PartitionSpec`; with `mesh`, size-1 mesh axes are dropped.

    Without a mesh this equals `flax.linen.logical_to_mesh_axes(logical_axes, rules)`.
    """
    return explain_spec(logical_axes, mesh=mesh, rules=rules)[0]


def spec_for(
    shape: Sequence[int], logical_axes: LogicalAxes, mesh: Mesh | Any, rules: Rules = RULES
) -> PartitionSpec:
    """Like `logical_to_mesh_spec`, but a mesh axis that does not divide its dim falls back to replication."""
    return explain_spec(logical_axes, mesh=mesh, shape=shape, rules=rules)[0]


# --- reading logical axes from Flax boxed params ---------------------------------------------------------


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical `PartitionSpec`s from `nn.LogicallyPartitioned` / `nn.Partitioned` boxes.

    The result has the structure of `nn.unbox(boxed_tree)`. Both box types' names are read as *logical* names
    (jaxtune never writes mesh axis names into a model). An unboxed array gets `PartitionSpec()`: replicated.
    """
    return nn.get_partition_spec(boxed_tree)


def _logical_of(spec: Any) -> tuple[str | None, ...]:
    if spec is None:
        return ()
    return tuple(spec)


def _resolve_tree(abstract_tree: Any, logical_axes_tree: Any, mesh: Any, rules: Rules) -> Any:
    """Tree (structure of the unboxed abstract tree) of (path, shape, logical, spec, notes)."""
    if logical_axes_tree is None:
        logical_axes_tree = logical_specs(abstract_tree)
    values = nn.unbox(abstract_tree)

    def one(path, leaf, spec):
        logical = _logical_of(spec)
        shape = tuple(leaf.shape)
        where = path_str(path)
        try:
            mesh_spec, notes = explain_spec(logical, mesh=mesh, shape=shape, rules=rules)
        except ValueError as e:
            raise RunError(f"{where}: {e}") from None
        return (where, shape, logical, mesh_spec, notes)

    # The abstract tree goes first so its leaves fix the structure: a logical spec at a leaf position is taken
    # whole, whether it is a PartitionSpec, a tuple of names or None.
    return jax.tree_util.tree_map_with_path(one, values, logical_axes_tree)


def _is_resolved(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 5 and isinstance(x[3], PartitionSpec)


def tree_shardings(abstract_tree: Any, logical_axes_tree: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """`NamedSharding` for every leaf of `abstract_tree` (shapes: `jax.ShapeDtypeStruct`s or arrays).

    `logical_axes_tree` mirrors the unboxed tree with a logical `PartitionSpec` / tuple of names per leaf; pass
    None to read the logical names from the Flax boxes in `abstract_tree` (what `jax.eval_shape(model.init, ...)`
    returns). The result mirrors the unboxed tree. Falls back to replication on non-dividing dims and logs why.
    """
    resolved = _resolve_tree(abstract_tree, logical_axes_tree, mesh, rules)
    flat = jax.tree.leaves(resolved, is_leaf=_is_resolved)
    fallbacks = [f"{where}: {note}" for where, _, _, _, notes in flat for note in notes]
    if fallbacks:
        log.warning(
            "%d sharding fallback(s) to replication (memory per device grows accordingly):\n  %s",
            len(fallbacks),
            "\n  ".join(fallbacks),
        )
    return jax.tree.map(lambda r: NamedSharding(mesh, r[3]), resolved, is_leaf=_is_resolved)


def sharding_snapshot(
    abstract_params: Any, mesh: Mesh | Any, logical_axes_tree: Any = None, rules: Rules = RULES
) -> dict[str, dict[str, Any]]:
    """`{"params/layers/q_proj/kernel": {"shape", "logical", "mesh_spec"[, "notes"]}}`, JSON-ready.

    Tests dump this and diff it against a checked-in copy (MaxText's sharding snapshot tests), so a change to
    the rules or the model's axis names shows up as a readable diff.
    """
    resolved = _resolve_tree(abstract_params, logical_axes_tree, mesh, rules)
    out: dict[str, dict[str, Any]] = {}
    for where, shape, logical, spec, notes in jax.tree.leaves(resolved, is_leaf=_is_resolved):
        entry: dict[str, Any] = {
            "shape": list(shape),
            "logical": list(logical),
            "mesh_spec": [list(e) if isinstance(e, tuple) else e for e in spec],
        }
        if notes:
            entry["notes"] = list(notes)
        out[where] = entry
    return out


# --- activations -----------------------------------------------------------------------------------------


def _context_mesh() -> Any | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: LogicalAxes, mesh: Mesh | None = None, rules: Rules = RULES):
    """`with_sharding_constraint` by logical names; a no-op outside a mesh context.

    The mesh is `mesh` or the one set by `jax.set_mesh` / `sharding_context`. Without either (single-device
    runs, unit tests of layers) the array is returned unchanged, so layers can constrain unconditionally.
    """
    target = mesh if mesh is not None else _context_mesh()
    if target is None:
        return x
    spec = spec_for(x.shape, logical_axes, target, rules)
    if mesh is not None:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = RULES) -> Iterator[Mesh]:
    """Make `mesh` current for `constrain` and Flax's `nn.with_logical_constraint` (with these rules)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
