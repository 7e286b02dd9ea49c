"""The device mesh: axes ("data", "fsdp", "tensor"), sizes from the config, `-1` = the rest.

Within a slice / host the sizes are the ICI (fast interconnect) sizes; `dcn_*` sizes multiply them across
slices (TPU multi-slice) or hosts (GPU nodes), the MaxText convention: the mesh axis `data` has size
`dcn_data * data`, with the DCN factor outermost so that only the axes you choose cross the slow network.
Put data parallelism on DCN (`dcn_data`), keep `fsdp` and `tensor` inside a slice.

Device placement uses `jax.experimental.mesh_utils` (topology-aware on TPU and GPU); where it cannot (CPU,
unusual shapes) the devices are laid out in id order instead, with a warning on accelerators.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxtune.errors import RunError
from jaxtune.parallel.rules import DATA, FSDP, MESH_AXES, TENSOR

log = logging.getLogger(__name__)


def _check_size(name: str, value: Any, allow_rest: bool) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and (value >= 1 or (allow_rest and value == -1)):
        return int(value)
    rest = " or -1 (use the remaining devices)" if allow_rest else ""
    raise RunError(f"parallel.{name} must be a positive integer{rest}, got {value!r}.")


def _describe(names: Sequence[str], sizes: Sequence[int]) -> str:
    return " × ".join(f"{n}={s}" for n, s in zip(names, sizes))


def resolve_sizes(
    n_devices: int, ici: Sequence[int], dcn: Sequence[int] = (1, 1, 1), where: str = ""
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate sizes and replace a `-1` ICI size by the rest; returns (ici, dcn) without -1."""
    ici = tuple(_check_size(n, v, allow_rest=True) for n, v in zip(MESH_AXES, ici))
    dcn = tuple(_check_size(f"dcn_{n}", v, allow_rest=False) for n, v in zip(MESH_AXES, dcn))
    dcn_names = [f"dcn_{n}" for n in MESH_AXES]
    n_granules = math.prod(dcn)
    if n_devices % n_granules:
        raise RunError(
            f"{_describe(dcn_names, dcn)} makes {n_granules} slices/hosts, but {n_devices} devices{where} do not "
            f"split into {n_granules} equal groups. Make the dcn_* product divide {n_devices}."
        )
    per_granule = n_devices // n_granules
    rest = [i for i, v in enumerate(ici) if v == -1]
    if len(rest) > 1:
        raise RunError(
            f"Only one of parallel.data/fsdp/tensor may be -1 (the rest), got {_describe(MESH_AXES, ici)}."
        )
    if rest:
        known = math.prod(v for v in ici if v != -1)
        if per_granule % known:
            raise RunError(
                f"Cannot infer parallel.{MESH_AXES[rest[0]]}=-1: the other sizes multiply to {known}, which does "
                f"not divide the {per_granule} devices per slice{where}."
            )
        ici = tuple(per_granule // known if v == -1 else v for v in ici)
    if math.prod(ici) != per_granule:
        dcn_part = f" (per slice; {_describe(dcn_names, dcn)})" if n_granules > 1 else ""
        raise RunError(
            f"Mesh {_describe(MESH_AXES, ici)}{dcn_part} needs {math.prod(ici) * n_granules} devices, but "
            f"{n_devices} are available{where}. Make the product {per_granule}, or set one of "
            "parallel.data/fsdp/tensor to -1 to use the rest."
        )
    return ici, dcn


def _granule(device: Any) -> int:
    # TPU multi-slice: one granule per slice; GPUs / CPUs: one per process (host).
    slice_index = getattr(device, "slice_index", None)
    return device.process_index if slice_index is None else slice_index


def _plain_layout(devices: Sequence[Any], ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    """Devices in (granule, id) order; each mesh axis = dcn factor (outer) × ici factor (inner)."""
    ordered = sorted(devices, key=lambda d: (_granule(d), d.id))
    grid = np.asarray(ordered, dtype=object).reshape(*dcn, *ici)  # [Dd, Df, Dt, d, f, t]
    grid = grid.transpose(0, 3, 1, 4, 2, 5)  # [Dd, d, Df, f, Dt, t]
    return grid.reshape(*(a * b for a, b in zip(dcn, ici)))


def _device_array(devices: Sequence[Any], ici: tuple[int, ...], dcn: tuple[int, ...]) -> np.ndarray:
    try:
        if math.prod(dcn) > 1:
            has_slices = getattr(devices[0], "slice_index", None) is not None
            return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not has_slices)
        return mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError, KeyError, AttributeError) as e:
        if devices[0].platform != "cpu":
            log.warning("Topology-aware mesh creation failed (%s); laying devices out in id order.", e)
        return _plain_layout(devices, ici, dcn)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    dcn_tensor: int = 1,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: every device of every process).

    Sizes are per slice/host; each axis's total is `dcn_<axis> * <axis>`. `-1` in one of data/fsdp/tensor means
    "the remaining devices". A product that does not match the device count raises a `ValueError` naming both.
    """
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform if devices else "?"
    ici, dcn = resolve_sizes(
        len(devices), (data, fsdp, tensor), (dcn_data, dcn_fsdp, dcn_tensor), where=f" ({platform})"
    )
    grid = _device_array(devices, ici, dcn)
    # Auto axes: jaxtune places arrays with explicit jit in/out shardings and logical constraints and lets
    # XLA's sharding propagation do the rest. (`jax.make_mesh` now defaults to Explicit axes, which change the
    # typing rules of every op; we do not want that.)
    return Mesh(grid, (DATA, FSDP, TENSOR), axis_types=(AxisType.Auto,) * 3)


def mesh_from_config(cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from any object with attributes data, fsdp, tensor (and optionally dcn_*), e.g. ParallelConfig."""
    sizes = {
        name: getattr(cfg, name, default)
        for name, default in [
            (DATA, -1),
            (FSDP, 1),
            (TENSOR, 1),
            ("dcn_data", 1),
            ("dcn_fsdp", 1),
            ("dcn_tensor", 1),
        ]
    }
    return make_mesh(**sizes, devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    """One line for logs: `mesh data=2 × fsdp=4 × tensor=1 over 8 cpu devices (2 processes)`."""
    devices = mesh.devices.flat
    first = next(iter(devices))
    n_proc = len({d.process_index for d in mesh.devices.flat})
    return (
        f"mesh {_describe(mesh.axis_names, list(mesh.shape.values()))} over {mesh.devices.size} "
        f"{first.platform} devices ({n_proc} process{'es' if n_proc > 1 else ''})"
    )
