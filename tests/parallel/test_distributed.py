"""Multi-process setup: the environment -> jax.distributed decision, and a real 2-process run on CPU.

The 2-process test starts two interpreters with 4 fake CPU devices each, joined by jax.distributed through a
coordinator on localhost, and checks that both see one 8-device mesh, read disjoint halves of the batch, and
agree on a cross-process reduction whose value is known in closed form.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from proc_helpers import communicate_all

from jaxtune.parallel import distributed
from jaxtune.parallel.distributed import plan_distributed, slurm_coordinator

REPO = Path(__file__).resolve().parents[2]


def cfg(**kw):
    base = dict(distributed="auto", coordinator_address=None, num_processes=None, process_id=None)
    return SimpleNamespace(**{**base, **kw})


SLURM_ONE_PER_NODE = {
    "SLURM_JOB_ID": "1000",
    "SLURM_STEP_NODELIST": "gpu[003-006]",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_NODES": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
}


# --- plan_distributed: pure, nothing connects --------------------------------------------------------------


def test_off_never_initialises():
    plan = plan_distributed(cfg(distributed="off"), env=SLURM_ONE_PER_NODE, on_tpu_vm=True)
    assert not plan.initializes and plan.source == "off"


def test_auto_alone_does_nothing():
    plan = plan_distributed(cfg(), env={}, on_tpu_vm=False)
    assert not plan.initializes and plan.source == "single"
    assert not plan_distributed(None, env={}, on_tpu_vm=False).initializes  # no config at all: auto


def test_explicit_from_env():
    env = {"JAXTUNE_COORDINATOR": "10.0.0.1:1234", "JAXTUNE_NUM_PROCESSES": "4", "JAXTUNE_PROCESS_ID": "3"}
    plan = plan_distributed(cfg(), env=env, on_tpu_vm=False)
    assert plan.source == "explicit"
    assert plan.kwargs == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "cluster_detection_method": "deactivate",
    }


def test_config_wins_over_env_and_process_zero_counts():
    env = {"JAXTUNE_COORDINATOR": "10.0.0.1:1234", "JAXTUNE_NUM_PROCESSES": "4", "JAXTUNE_PROCESS_ID": "3"}
    plan = plan_distributed(cfg(coordinator_address="head:99", process_id=0), env=env, on_tpu_vm=False)
    assert plan.kwargs["coordinator_address"] == "head:99"
    assert plan.kwargs["process_id"] == 0  # 0 is a value, not "unset"
    assert plan.kwargs["num_processes"] == 4


def test_explicit_single_process():
    explicit = dict(coordinator_address="h:1", num_processes=1, process_id=0)
    assert not plan_distributed(cfg(**explicit), env={}, on_tpu_vm=False).initializes
    assert plan_distributed(cfg(distributed="on", **explicit), env={}, on_tpu_vm=False).initializes


@pytest.mark.parametrize(
    "kw, env, message",
    [
        ({"coordinator_address": "h:1"}, {}, "missing: number of processes, process id"),
        ({}, {"JAXTUNE_PROCESS_ID": "1"}, "missing: coordinator address, number of processes"),
        ({}, {"JAXTUNE_NUM_PROCESSES": "two"}, "JAXTUNE_NUM_PROCESSES must be an integer"),
        ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {}, "'host:port'"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process id 2 of 2"),
        ({"distributed": "yes"}, {}, "must be one of auto, on, off"),
    ],
)
def test_bad_setups_are_user_errors(kw, env, message):
    with pytest.raises(ValueError, match=message):
        plan_distributed(cfg(**kw), env=env, on_tpu_vm=False)


def test_slurm_one_task_per_node_keeps_every_gpu():
    """Coordinator: first node gpu003; port = job id 1000 % 4096 + 61440 = 62440 (jax's rule)."""
    plan = plan_distributed(cfg(), env=SLURM_ONE_PER_NODE, on_tpu_vm=False)
    assert plan.source == "slurm"
    assert plan.kwargs == {
        "coordinator_address": "gpu003:62440",
        "num_processes": 4,
        "process_id": 2,
        "cluster_detection_method": "deactivate",  # no local_device_ids=[SLURM_LOCALID] pinning
    }


def test_slurm_one_task_per_gpu_uses_jax_detection():
    env = {**SLURM_ONE_PER_NODE, "SLURM_NTASKS": "16"}
    plan = plan_distributed(cfg(), env=env, on_tpu_vm=False)
    assert plan.kwargs == {"cluster_detection_method": "slurm"}


def test_slurm_single_task_is_single_process():
    env = {**SLURM_ONE_PER_NODE, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": "0"}
    assert not plan_distributed(cfg(), env=env, on_tpu_vm=False).initializes


@pytest.mark.parametrize(
    "nodes, port, expected",
    [
        ("node001", None, "node001:62440"),
        ("node001,host2", None, "node001:62440"),
        ("node[001-015],host2", None, "node001:62440"),
        ("node[007,009-015]", "1234", "node007:1234"),
    ],
)
def test_slurm_coordinator_formats(nodes, port, expected):
    env = {"SLURM_STEP_NODELIST": nodes, "SLURM_JOB_ID": "1000"}
    if port:
        env["JAX_COORDINATOR_PORT"] = port
    assert slurm_coordinator(env) == expected


def test_tpu_vm():
    assert plan_distributed(cfg(), env={}, on_tpu_vm=True).kwargs == {}  # jax reads the TPU metadata
    gke_single = {"TPU_WORKER_HOSTNAMES": "host-0"}
    assert not plan_distributed(cfg(), env=gke_single, on_tpu_vm=True).initializes
    gke_pod = {"TPU_WORKER_HOSTNAMES": "host-0,host-1"}
    assert plan_distributed(cfg(), env=gke_pod, on_tpu_vm=True).kwargs == {}


def test_on_without_a_cluster_asks_jax():
    plan = plan_distributed(cfg(distributed="on"), env={}, on_tpu_vm=False)
    assert plan.source == "jax" and plan.kwargs == {}


def test_init_distributed_only_calls_jax_when_planned(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAXTUNE_COORDINATOR", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert not distributed.init_distributed(cfg()).initializes
    assert not distributed.init_distributed(cfg(distributed="off")).initializes
    assert calls == []
    explicit = cfg(coordinator_address="h:1", num_processes=2, process_id=1)
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
    distributed.init_distributed(explicit)  # already initialised: idempotent
    assert calls == []


# --- two real processes ------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    # Cross-process collectives on CPU need a backend; gloo is jax's default in recent versions.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
        pass
    from jaxtune.parallel import (host_local_to_global, init_distributed, is_main_process, make_mesh,
                                  process_batch_slice)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P

    plan = init_distributed()  # explicit, from JAXTUNE_* env
    out = {"plan": plan.source, "process": jax.process_index(), "count": jax.process_count(),
           "devices": jax.device_count(), "local": jax.local_device_count(), "main": is_main_process()}
    for name, sizes in {"dp": dict(data=-1), "hybrid": dict(data=1, fsdp=4, dcn_data=2)}.items():
        mesh = make_mesh(**sizes)
        start, stop = process_batch_slice(16, mesh)
        full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
        batch = host_local_to_global({"x": full[start:stop]}, mesh)
        x = batch["x"]
        total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, P()))(x)
        psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), ("data", "fsdp")), mesh=mesh,
                                     in_specs=P(("data", "fsdp")), out_specs=P()))(x)
        rows = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
        out[name] = {"shape": list(mesh.shape.values()), "slice": [start, stop], "global": list(x.shape),
                     "sum": float(total.addressable_data(0)), "psum": float(psum.addressable_data(0)),
                     "mean": float(jax.jit(jnp.mean)(x).addressable_data(0)), "rows_by_process": rows}
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree():
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXTUNE_", "TPU_"))}
    base.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAXTUNE_COORDINATOR=f"127.0.0.1:{port}",
        JAXTUNE_NUM_PROCESSES="2",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env={**base, "JAXTUNE_PROCESS_ID": str(i)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = communicate_all(procs, timeout=120)
    results = [
        json.loads(line[len("RESULT ") :])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    assert [r["process"] for r in results] == [0, 1]
    assert [r["main"] for r in results] == [True, False]  # only process 0 logs and exports
    # sum of 0..47 = 47·48/2 = 1128; mean = 1128 / 48 = 23.5
    for r in results:
        assert (r["plan"], r["count"], r["devices"], r["local"]) == ("explicit", 2, 8, 4)
        for name, shape in [("dp", [8, 1, 1]), ("hybrid", [2, 4, 1])]:
            assert r[name]["shape"] == shape
            assert r[name]["global"] == [16, 3]
            assert r[name]["sum"] == r[name]["psum"] == 1128.0
            assert r[name]["mean"] == 23.5
        # dcn_data=2 puts one process on each data row: only the data axis crosses hosts.
        assert r["hybrid"]["rows_by_process"] == [[0], [1]]
    # Each host reads its own half of the batch.
    assert [r["dp"]["slice"] for r in results] == [[0, 8], [8, 16]]
    assert [r["hybrid"]["slice"] for r in results] == [[0, 8], [8, 16]]
