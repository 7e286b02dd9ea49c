"""Multi-process JAX: `jax.distributed.initialize` from the environment, process 0, per-host batch slices.

One process per host (per TPU VM worker, per GPU node, or per GPU under SLURM), every process running the same
program over a global mesh. Where the setup comes from, in order:
1. explicit: `parallel.coordinator_address` / `num_processes` / `process_id`, or the environment variables
   JAXTUNE_COORDINATOR ("host:port"), JAXTUNE_NUM_PROCESSES, JAXTUNE_PROCESS_ID (config wins);
2. SLURM: `srun` tasks (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID);
3. Cloud TPU VM: `jax.distributed.initialize()` without arguments, jax reads the workers from the TPU metadata.
`parallel.distributed`: "off" never initialises; "auto" (default) initialises only when one of the above says
there is more than one process; "on" always does (and fails loudly when nothing describes the cluster).

`plan_distributed` is the pure decision (tested without connecting anything); `init_distributed` acts on it.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import RunError
from jaxtune.parallel.rules import logical_to_mesh_spec, spec_for

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXTUNE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXTUNE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXTUNE_PROCESS_ID"
MODES = ("auto", "on", "off")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistributedPlan:
    """What `init_distributed` will do: `kwargs` for `jax.distributed.initialize`, or None for nothing."""

    source: str  # "off" | "single" | "explicit" | "slurm" | "tpu" | "jax"
    reason: str
    kwargs: dict[str, Any] | None = None

    @property
    def initializes(self) -> bool:
        return self.kwargs is not None


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RunError(f"{name} must be an integer, got {value!r}.") from None


def _on_tpu_vm() -> bool:
    # The device files libtpu opens (/dev/accel* on v2-v4, vfio on v5+); no network, unlike jax's own check.
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def slurm_coordinator(env: Mapping[str, str]) -> str:
    """First host of SLURM_STEP_NODELIST and jax's port choice (JAX_COORDINATOR_PORT, else from the job id).

    Handles 'node001', 'node001,host2', 'node[001-015],host2' and 'node[001,007-015]' like jax's SlurmCluster.
    """
    nodes = env["SLURM_STEP_NODELIST"]
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    cut = next((i for i, ch in enumerate(nodes) if ch in ",["), len(nodes))
    if cut == len(nodes) or nodes[cut] == ",":
        return f"{nodes[:cut]}:{port}"
    first = nodes[cut + 1 :].replace("-", ",").split(",")[0].rstrip("]")
    return f"{nodes[:cut]}{first}:{port}"


def plan_distributed(
    cfg: Any = None, env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None
) -> DistributedPlan:
    """Decide how (and whether) to initialise jax.distributed from `cfg` (a ParallelConfig-like object) and env."""
    env = os.environ if env is None else env
    mode = getattr(cfg, "distributed", "auto") or "auto"
    if mode not in MODES:
        raise RunError(f"parallel.distributed must be one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "off":
        return DistributedPlan("off", "parallel.distributed=off")

    coordinator = getattr(cfg, "coordinator_address", None) or env.get(ENV_COORDINATOR) or None
    cfg_num, cfg_pid = getattr(cfg, "num_processes", None), getattr(cfg, "process_id", None)
    num = (
        _int(cfg_num, "parallel.num_processes")
        if cfg_num is not None
        else _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
    )
    pid = (
        _int(cfg_pid, "parallel.process_id")
        if cfg_pid is not None
        else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    )

    if coordinator is not None or num is not None or pid is not None:
        given = {"coordinator address": coordinator, "number of processes": num, "process id": pid}
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise RunError(
                f"An explicit multi-process setup needs all of coordinator address, number of processes and "
                f"process id; missing: {', '.join(missing)}. Set parallel.coordinator_address / num_processes / "
                f"process_id, or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}."
            )
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise RunError(f"Coordinator address must look like 'host:port', got {coordinator!r}.")
        if num < 1 or not 0 <= pid < num:
            raise RunError(f"Need 0 <= process id < number of processes, got process id {pid} of {num}.")
        if num == 1 and mode == "auto":
            return DistributedPlan("single", "explicit setup with one process")
        # "deactivate": every value is given; without it jax would still run its SLURM detection and restrict
        # this process to the single GPU SLURM_LOCALID, although we run one process per node.
        kwargs = dict(
            coordinator_address=coordinator,
            num_processes=num,
            process_id=pid,
            cluster_detection_method="deactivate",
        )
        return DistributedPlan("explicit", f"process {pid} of {num}, coordinator {coordinator}", kwargs)

    if all(v in env for v in _SLURM_VARS):
        ntasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
        nodes = _int(
            env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or ntasks, "SLURM_STEP_NUM_NODES"
        )
        if ntasks == 1 and mode == "auto":
            return DistributedPlan("single", "SLURM job with one task")
        if ntasks == nodes:
            # One task per node sees every GPU of its node. jax's SLURM detection would pin each process to
            # GPU SLURM_LOCALID (right for one task per GPU only), so pass the values ourselves.
            pid = _int(env["SLURM_PROCID"], "SLURM_PROCID")
            kwargs = dict(
                coordinator_address=slurm_coordinator(env),
                num_processes=ntasks,
                process_id=pid,
                cluster_detection_method="deactivate",
            )
            return DistributedPlan("slurm", f"SLURM task {pid} of {ntasks}, one per node", kwargs)
        return DistributedPlan(
            "slurm", f"SLURM, {ntasks} tasks on {nodes} nodes", {"cluster_detection_method": "slurm"}
        )

    on_tpu_vm = _on_tpu_vm() if on_tpu_vm is None else on_tpu_vm
    if on_tpu_vm:
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
        slices = _int(env.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
        if mode == "auto" and hosts is not None and "," not in hosts and slices == 1:
            return DistributedPlan("single", "single-host TPU (GKE)")
        # On a GCE TPU VM only the metadata server knows the worker list; jax asks it. A single-host VM then
        # becomes a one-process cluster, which costs nothing.
        return DistributedPlan("tpu", "Cloud TPU VM: jax reads the workers from the TPU metadata", {})

    if mode == "on":
        return DistributedPlan("jax", "parallel.distributed=on: jax's own cluster detection", {})
    return DistributedPlan("single", "no multi-process environment detected")


def init_distributed(cfg: Any = None) -> DistributedPlan:
    """Initialise jax.distributed as `plan_distributed` decides; idempotent. Call before anything touches jax."""
    plan = plan_distributed(cfg)
    if not plan.initializes:
        log.debug("jax.distributed not initialised: %s", plan.reason)
        return plan
    if jax.distributed.is_initialized():
        return plan
    try:
        jax.distributed.initialize(**plan.kwargs)
    except (RuntimeError, ValueError) as e:
        hint = (
            f"Describe the cluster with parallel.coordinator_address/num_processes/process_id (or "
            f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}), run under srun, or set "
            "parallel.distributed=off for a single process. init_distributed must run before any jax "
            "computation or jax.devices() call."
        )
        raise RunError(
            f"jax.distributed.initialize failed ({plan.source}: {plan.reason}): {e}\n{hint}"
        ) from e
    log.info(
        "jax.distributed: process %d of %d (%s: %s)",
        jax.process_index(),
        jax.process_count(),
        plan.source,
        plan.reason,
    )
    return plan


def is_main_process() -> bool:
    """True on process 0: the only one that writes logs, metrics and exports."""
    return jax.process_index() == 0


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """The mesh spec of a batch's leading dim (logical `batch`), size-1 mesh axes dropped."""
    return logical_to_mesh_spec(("batch",), mesh=mesh)


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> tuple[int, int]:
    """Rows `[start, stop)` of each global batch that this process reads.

    With `mesh`, the rows are those held by this process's devices under the `batch` sharding (every row when
    the batch is replicated across processes, e.g. a tensor-parallel-only mesh). Without, an equal split.
    """
    n, i = jax.process_count(), jax.process_index()
    if mesh is None:
        if global_batch_size % n:
            raise RunError(
                f"Global batch size {global_batch_size} must be divisible by the {n} processes so each reads "
                "an equal slice."
            )
        rows = global_batch_size // n
        return i * rows, (i + 1) * rows
    spec = spec_for((global_batch_size,), ("batch",), mesh)
    if spec != batch_spec(mesh):
        raise RunError(
            f"Global batch size {global_batch_size} must be divisible by the batch-parallel devices "
            f"(mesh {dict(mesh.shape)}: data × fsdp)."
        )
    index_map = NamedSharding(mesh, spec).addressable_devices_indices_map((global_batch_size,))
    spans = sorted(
        {(s.start or 0, global_batch_size if s.stop is None else s.stop) for (s,) in index_map.values()}
    )
    start, stop = spans[0][0], max(end for _, end in spans)
    if sum(end - begin for begin, end in spans) != stop - start:
        raise RunError(
            f"This process's devices hold non-contiguous batch rows {spans}; build the mesh with make_mesh so "
            "each process owns a contiguous block of the data axes."
        )
    return start, stop


def host_local_to_global(array_tree: Any, mesh: Mesh, spec: PartitionSpec | None = None) -> Any:
    """Global arrays from each process's rows (`process_batch_slice`), sharded by `spec` (default: the batch).

    Every leaf's leading dim is this process's rows; the global shape is inferred by jax.
    """
    sharding = NamedSharding(mesh, batch_spec(mesh) if spec is None else spec)

    def one(local):
        return jax.make_array_from_process_local_data(sharding, np.asarray(local))

    return jax.tree.map(one, array_tree)


def place(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays in `shardings` (no copy for a leaf already there).

    A host-local value on one of several processes (e.g. freshly initialised LoRA factors, identical on every
    process) is turned into a global array from each process's own slices; anything else is `device_put`.
    """

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        fully_local = not isinstance(x, jax.Array) or x.is_fully_addressable
        if jax.process_count() > 1 and fully_local:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree, shardings)
