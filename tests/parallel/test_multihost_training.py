"""`jaxtune train` over 2 processes joined by jax.distributed equals the single-process run.

Two interpreters with 4 fake CPU devices each (coordinator on a free localhost port, the JAXTUNE_* variables a
cluster launcher would set) train one mesh data=2 × fsdp=4, data parallelism across the processes and FSDP
inside each (`dcn_data=2`, the multi-host layout the README recommends). Each process reads its own half of
every global batch; the oracle is the same config run by one process on one device: the per-step losses agree
to fp32 reduction-order noise. Only process 0 writes metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from parallel.conftest import FAST_COMPILE
from proc_helpers import communicate_all

from jaxtune import demo

REPO = Path(__file__).resolve().parents[2]

STEPS = 3
BATCH = 16


def config(tmp_path: Path, name: str, train_file: Path) -> Path:
    cfg = {
        "stage": "sft",
        "output_dir": str(tmp_path / name),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"train": [str(train_file)], "cutoff_len": 48, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 1e-3, "adam_eps": 1e-6, "batch_size": BATCH, "max_steps": STEPS,
                     "save_every": 0, "export_hf": False},
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_two_processes_train_like_one(tmp_path):
    train_file, _ = demo.write_dataset(tmp_path / "data", n_train=256, n_eval=8, seed=0)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXTUNE_", "TPU_", "XLA_"))}
    base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = free_port()
    multi = config(tmp_path, "multi", train_file)
    mesh = ["parallel.data=1", "parallel.fsdp=4", "parallel.dcn_data=2"]
    jobs = [
        (
            [str(multi), *mesh],
            {
                "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
                "JAXTUNE_COORDINATOR": f"127.0.0.1:{port}",
                "JAXTUNE_NUM_PROCESSES": "2",
                "JAXTUNE_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    jobs.append(([str(config(tmp_path, "single", train_file))], {"XLA_FLAGS": FAST_COMPILE}))  # the oracle
    procs = [
        subprocess.Popen([sys.executable, "-m", "jaxtune", "train", *args], env={**base, **env}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for args, env in jobs
    ]  # fmt: skip
    outputs = communicate_all(procs, timeout=300)

    assert "mesh data=2 × fsdp=4 × tensor=1 over 8 cpu devices (2 processes)" in outputs[0]
    assert f"process 0 of 2 feeds rows [0, 8) of each global batch of {BATCH}" in outputs[0]
    assert f"process 1 of 2 feeds rows [8, 16) of each global batch of {BATCH}" in outputs[1]
    multi_rows, single_rows = train_rows(tmp_path / "multi"), train_rows(tmp_path / "single")
    assert [r["step"] for r in multi_rows] == list(range(1, STEPS + 1))  # process 1 wrote no second copy
    for m, s in zip(multi_rows, single_rows, strict=True):
        assert m["tokens"] == s["tokens"]  # the same global batch, token for token
        for key in ("loss", "grad_norm"):
            assert abs(m[key] - s[key]) <= 1e-5 * abs(s[key]), (m["step"], key, m[key], s[key])
    assert (tmp_path / "multi" / "checkpoints" / str(STEPS)).is_dir()  # both processes joined the final save
