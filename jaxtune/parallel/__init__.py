"""Parallelism: the device mesh, the logical -> mesh sharding table, and multi-process setup."""

from jaxtune.parallel.distributed import (
    DistributedPlan,
    host_local_to_global,
    init_distributed,
    is_main_process,
    plan_distributed,
    process_batch_slice,
)
from jaxtune.parallel.mesh import describe_mesh, make_mesh, mesh_from_config
from jaxtune.parallel.rules import (
    DATA,
    FSDP,
    LOGICAL_AXES,
    MESH_AXES,
    RULES,
    TENSOR,
    constrain,
    explain_spec,
    logical_specs,
    logical_to_mesh_spec,
    sharding_context,
    sharding_snapshot,
    spec_for,
    tree_shardings,
)

__all__ = [
    "DATA",
    "FSDP",
    "LOGICAL_AXES",
    "MESH_AXES",
    "RULES",
    "TENSOR",
    "DistributedPlan",
    "constrain",
    "describe_mesh",
    "explain_spec",
    "host_local_to_global",
    "init_distributed",
    "is_main_process",
    "logical_specs",
    "logical_to_mesh_spec",
    "make_mesh",
    "mesh_from_config",
    "plan_distributed",
    "process_batch_slice",
    "sharding_context",
    "sharding_snapshot",
    "spec_for",
    "tree_shardings",
]
