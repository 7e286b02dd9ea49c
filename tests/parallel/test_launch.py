"""launch/tpu.sh and launch/gpu.sh: help, the exact dry-run commands for a named config, early errors, shellcheck.

Nothing here talks to a cloud or a cluster: every run is --dry-run or fails validation before the first
gcloud / srun call.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
COMMON = REPO / "launch" / "common.sh"  # the helpers both source
BASH = shutil.which("bash") or "/bin/bash"


def launch(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(script), *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("# jaxtune train demo.yaml\nmodel: tiny\n")
    return path


@pytest.fixture
def bare_path(tmp_path):
    """A PATH with the few tools the scripts need before their gcloud / srun check, and neither of those."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("basename", "dirname", "tr", "cat", "git", "mktemp", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize("script", [TPU, GPU])
def test_help(script):
    for flag in ("--help", "-h"):
        proc = launch(script, flag)
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout and "--config" in proc.stdout
    shipped = re.findall(r"configs/[\w/]+\.yaml", proc.stdout)
    assert shipped and all((REPO / c).is_file() for c in shipped), shipped  # the examples name real configs


# --- tpu.sh ----------------------------------------------------------------------------------------------


def test_tpu_dry_run_prints_the_exact_commands(config):
    proc = launch(
        TPU, "--config", str(config), "--zone", "us-central2-b", "--accelerator-type", "v4-32",
        "--name", "my-tpu", "--spot", "--dry-run", "--", "training.max_steps=10",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    zone = "--zone=us-central2-b"
    assert f"gcloud compute tpus tpu-vm describe my-tpu {zone} --format='value(state)'" in lines
    assert (
        f"gcloud compute tpus tpu-vm create my-tpu {zone} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
        in lines
    )
    assert any(
        line.startswith(f"git -C {REPO} archive --format=tar.gz --prefix=jaxtune/run/ --add-file={config} ")
        for line in lines
    )
    assert (
        f"gcloud compute tpus tpu-vm scp /tmp/jaxtune-XXXXXX.tar.gz my-tpu:jaxtune.tar.gz --worker=all {zone}"
        in lines
    )
    assert any("--worker=all" in line and "pip install -q -e ." in line for line in lines)
    train = (
        f"gcloud compute tpus tpu-vm ssh my-tpu --worker=all {zone} "
        "--command='cd ~/jaxtune && python3 -m jaxtune train run/demo.yaml training.max_steps=10 "
        "> ~/jaxtune-train.log 2>&1'"
    )
    assert train in lines
    assert (
        f"gcloud compute tpus tpu-vm ssh my-tpu --worker=0 {zone} --command='tail -n +1 -F ~/jaxtune-train.log'"
        in lines
    )


def test_tpu_queued_and_restarts(config):
    proc = launch(
        TPU, "--config", str(config), "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--name", "pod",
        "--project", "proj", "--queued", "--spot", "--restarts", "3", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        "gcloud compute tpus queued-resources create pod --node-id=pod --zone=us-east5-a --project=proj "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot" in out
    )
    assert (
        "gcloud compute tpus queued-resources delete pod --zone=us-east5-a --project=proj --force --quiet"
        in out
    )
    assert "jaxtune train run/demo.yaml" in out and "--worker=all" in out


def test_tpu_overrides_are_quoted_for_the_remote_shell(config):
    proc = launch(
        TPU, "--config", str(config), "--zone", "europe-west4-a", "--dry-run", "--", "data.name=a b"
    )
    assert proc.returncode == 0, proc.stderr
    # The remote command line is single-quoted once more by the printer; a shell reading it gets 'data.name=a b'.
    assert "run/demo.yaml '\\''data.name=a b'\\'' >" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config", "/nonexistent/run.yaml", "--zone", "us-central2-b"],
            "config file '/nonexistent/run.yaml' does not exist",
        ),
        (["--zone", "us-central2-b"], "--config CONFIG.yaml is required"),
        (["--config", "{config}"], "--zone is required"),
        (["--config", "{config}", "--zone", "us-central2"], "zone 'us-central2' is not a zone name"),
        (["--config", "{config}", "--zone", "US_CENTRAL"], "is not a zone name"),
        (
            ["--config", "{config}", "--zone", "us-central2-b", "--accelerator-type", "tpu4"],
            "accelerator type 'tpu4'",
        ),
        (["--config", "{config}", "--zone", "us-central2-b", "--restarts", "x"], "--restarts must be"),
        (["--config", "{config}", "--zone", "us-central2-b", "--queued", "--preemptible"], "use --spot"),
        (["--config", "{config}", "--zone", "us-central2-b", "--bogus"], "unknown option '--bogus'"),
    ],
)
def test_tpu_fails_early_with_a_clear_message(config, args, message):
    args = [a.replace("{config}", str(config)) for a in args]
    proc = launch(TPU, *args, "--dry-run", env={**os.environ, "CLOUDSDK_COMPUTE_ZONE": ""})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""  # nothing printed or run before the error


def test_tpu_without_gcloud(config, bare_path):
    proc = launch(TPU, "--config", str(config), "--zone", "us-central2-b", env=bare_path)
    assert proc.returncode == 2
    assert "gcloud is not on PATH" in proc.stderr


# --- gpu.sh ----------------------------------------------------------------------------------------------


def test_gpu_single_host(config):
    proc = launch(GPU, "--config", str(config), "--dry-run", "--", "training.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"python3 -m jaxtune train {config} training.max_steps=3"]
    proc = launch(GPU, "--config", str(config), "--gpus", "0,1,2,3", "--dry-run")
    assert proc.stdout.splitlines() == [f"env CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m jaxtune train {config}"]


def test_gpu_multi_node_srun(config):
    proc = launch(GPU, "--config", str(config), "--nodes", "4", "--partition", "gpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --job-name=jaxtune "
        f"--partition=gpu python3 -m jaxtune train {config}"
    ]


def test_gpu_sbatch_script(config, tmp_path):
    script = tmp_path / "run.sbatch"
    proc = launch(
        GPU, "--config", str(config), "--nodes", "2", "--gpus-per-node", "4", "--time", "12:00:00",
        "--port", "4321", "--sbatch", str(script), "--dry-run", "--", "training.max_steps=100",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=12:00:00",
        "export JAX_COORDINATOR_PORT=4321",
        f"srun --kill-on-bad-exit=1 python3 -m jaxtune train {config} training.max_steps=100",
        f"sbatch {script}",
    ]:
        assert line in out.splitlines()
    assert not script.exists()  # dry run writes nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "/nonexistent/run.yaml"], "config file '/nonexistent/run.yaml' does not exist"),
        ([], "--config CONFIG.yaml is required"),
        (["--config", "{config}", "--nodes", "0"], "--nodes must be a positive integer"),
        (["--config", "{config}", "--nodes", "2", "--gpus", "0,1"], "--gpus is for single-host runs"),
        (["--config", "{config}", "--gpus", "all"], "--gpus must be a comma-separated list"),
        (["--config", "{config}", "--sbatch", "x.sbatch"], "--sbatch is for multi-node runs"),
    ],
)
def test_gpu_fails_early_with_a_clear_message(config, args, message):
    args = [a.replace("{config}", str(config)) for a in args]
    proc = launch(GPU, *args, "--dry-run")
    assert proc.returncode == 2
    assert message in proc.stderr


def test_gpu_multi_node_without_srun(config, bare_path):
    proc = launch(GPU, "--config", str(config), "--nodes", "2", env=bare_path)
    assert proc.returncode == 2
    assert "srun is not on PATH" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [TPU, GPU, COMMON])
def test_shellcheck(script):
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# --- the real control flow, against stub gcloud / srun / sbatch ---------------------------------------------

GCLOUD_STUB = r"""#!/bin/bash
# Records every call; keeps the TPU state in a file; the first training run is "preempted" when asked to.
echo "$*" >> "$STUB/calls"
case "$*" in
  *"tpu-vm describe"*) cat "$STUB/state" 2>/dev/null || exit 1 ;;
  *"tpu-vm create"*) echo READY > "$STUB/state" ;;
  *"tpu-vm delete"*) rm -f "$STUB/state" ;;
  *"tpu-vm scp"*) cp "$5" "$STUB/shipped.tar.gz" ;;
  *"--worker=0"*) echo "step 1 loss 2.0"; touch "$STUB/following"; exec sleep 30 ;;  # tail -F: ends when killed
  *"jaxtune train"*)
    # Finish only once the log stream is up, as a real run would; keeps the recorded call order deterministic.
    for _ in $(seq 100); do [ -e "$STUB/following" ] && break; sleep 0.05; done; rm -f "$STUB/following"
    runs=$(cat "$STUB/runs" 2>/dev/null || echo 0); echo $((runs + 1)) > "$STUB/runs"
    if [ "$runs" = 0 ] && [ -n "${PREEMPT_FIRST:-}" ]; then echo PREEMPTED > "$STUB/state"; exit 255; fi
    exit "${TRAIN_RC:-0}" ;;
esac
"""


@pytest.fixture
def checkout(tmp_path):
    """A committed copy of the launch scripts: tpu.sh ships `git archive` of its own checkout."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in (TPU, GPU, COMMON):
        shutil.copy(script, repo / "launch" / script.name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return repo


def stub_env(tmp_path, **extra):
    stub = tmp_path / "stub"
    (stub / "bin").mkdir(parents=True)
    gcloud = stub / "bin" / "gcloud"
    gcloud.write_text(GCLOUD_STUB)
    gcloud.chmod(0o755)
    for tool in ("srun", "sbatch"):
        path = stub / "bin" / tool
        path.write_text(
            f'#!/bin/bash\necho "{tool} JAX_COORDINATOR_PORT=${{JAX_COORDINATOR_PORT:-}} $*" >> "$STUB/calls"\n'
        )
        path.chmod(0o755)
    return stub, {**os.environ, "PATH": f"{stub / 'bin'}:{os.environ['PATH']}", "STUB": str(stub), **extra}


def test_tpu_restarts_after_preemption(checkout, config, tmp_path):
    stub, env = stub_env(tmp_path, PREEMPT_FIRST="1")
    args = ["--config", str(config), "--zone", "us-central2-b", "--name", "t", "--restarts", "2"]
    proc = launch(checkout / "launch" / "tpu.sh", *args, "--", "training.max_steps=5", env=env)
    assert proc.returncode == 0, proc.stderr
    calls = [" ".join(c.split()[:4]) for c in (stub / "calls").read_text().splitlines()]
    run = [
        "compute tpus tpu-vm scp",
        "compute tpus tpu-vm ssh",
        "compute tpus tpu-vm ssh",
        "compute tpus tpu-vm ssh",
    ]
    assert calls == [
        "compute tpus tpu-vm describe",  # absent
        "compute tpus tpu-vm create",
        *run,  # scp, install, train (preempted) + log stream
        "compute tpus tpu-vm describe",  # PREEMPTED -> restart 1 of 2
        "compute tpus tpu-vm describe",
        "compute tpus tpu-vm delete",
        "compute tpus tpu-vm create",
        *run,  # the rerun succeeds
    ]
    assert "restart 1 of 2" in proc.stderr and "training finished" in proc.stderr
    assert "step 1 loss 2.0" in proc.stdout  # worker 0's log was streamed
    train = [c for c in (stub / "calls").read_text().splitlines() if "jaxtune train" in c]
    assert train[0].endswith("run/demo.yaml training.max_steps=5 > ~/jaxtune-train.log 2>&1")
    listing = subprocess.run(
        ["tar", "-tzf", str(stub / "shipped.tar.gz")], capture_output=True, text=True
    ).stdout
    assert {"jaxtune/run/demo.yaml", "jaxtune/launch/tpu.sh"} <= set(listing.split())


def test_tpu_failure_on_a_healthy_tpu_is_not_retried(checkout, config, tmp_path):
    stub, env = stub_env(tmp_path, TRAIN_RC="3")
    (stub / "state").write_text("READY\n")  # an existing TPU is reused
    args = ["--config", str(config), "--zone", "us-central2-b", "--name", "t", "--restarts", "2"]
    proc = launch(checkout / "launch" / "tpu.sh", *args, env=env)
    assert proc.returncode == 3
    assert "not restarting" in proc.stderr and "reusing TPU t" in proc.stderr
    calls = (stub / "calls").read_text()
    assert "tpu-vm create" not in calls and calls.count("jaxtune train") == 1


def test_tpu_restarts_a_run_sigterm_stopped_on_a_healthy_tpu(checkout, config, tmp_path):
    """jaxtune exits 143 after a SIGTERM stopped it (and it checkpointed): rerun on the same TPU, --restarts times."""
    stub, env = stub_env(tmp_path, TRAIN_RC="143")
    (stub / "state").write_text("READY\n")
    args = ["--config", str(config), "--zone", "us-central2-b", "--name", "t", "--restarts", "1"]
    proc = launch(checkout / "launch" / "tpu.sh", *args, env=env)
    assert proc.returncode == 143
    assert "stopped by SIGTERM (exit 143)" in proc.stderr and "restart 1 of 1" in proc.stderr, proc.stderr
    assert "no restarts are left" in proc.stderr
    calls = (stub / "calls").read_text()
    assert "tpu-vm create" not in calls and calls.count("jaxtune train") == 2


def test_tpu_redeploy_keeps_the_previous_attempts_run_directory(checkout, config, tmp_path):
    """A restart on the same TPU ships the code again: what the tarball holds is replaced (a file deleted from the
    checkout goes), a relative output_dir's checkpoints (~/jaxtune/runs/...) stay, so the rerun resumes."""
    proc = launch(checkout / "launch" / "tpu.sh", "--config", str(config), "--zone", "us-central2-b", "--dry-run")
    deploy = next(line for line in proc.stdout.splitlines() if "tar -xzf" in line)
    command = next(a for a in shlex.split(deploy) if a.startswith("--command=")).removeprefix("--command=")
    install = 'python3 -m pip install -q -e . "jax[tpu]"'
    assert install in command
    home = tmp_path / "home"
    (home / "jaxtune" / "runs" / "demo" / "checkpoints" / "200").mkdir(parents=True)
    (home / "jaxtune" / "launch").mkdir()
    (home / "jaxtune" / "launch" / "removed_since.sh").write_text("old")
    (home / "jaxtune-train.log").write_text("the previous attempt's log")
    subprocess.run(["git", "-C", str(checkout), "archive", "--format=tar.gz", "--prefix=jaxtune/run/",
                    f"--add-file={config}", "--prefix=jaxtune/", "-o", str(home / "jaxtune.tar.gz"), "HEAD"],
                   check=True)  # fmt: skip
    subprocess.run([BASH, "-c", command.replace(install, "pwd > installed_in")], env={**os.environ, "HOME": str(home)},
                   check=True)  # fmt: skip
    assert (home / "jaxtune" / "runs" / "demo" / "checkpoints" / "200").is_dir()
    assert not (home / "jaxtune" / "launch" / "removed_since.sh").exists()
    assert (home / "jaxtune" / "launch" / "tpu.sh").is_file() and (home / "jaxtune" / "run" / "demo.yaml").is_file()
    assert (home / "jaxtune" / "installed_in").read_text().strip() == str(home / "jaxtune")
    assert not (home / "jaxtune-train.log").exists()


@pytest.mark.parametrize("yaml_line, overrides, warned", [
    ("", [], "runs/default"),
    ("output_dir: runs/sft_lora  # local\n", [], "runs/sft_lora"),
    ("output_dir: runs/x\n", ["output_dir=/mnt/gcs/run1"], None),
    ("output_dir: '/mnt/gcs/a'\n", [], None),
    ("output_dir: /mnt/gcs/a\n", ["output_dir=out/b"], "out/b"),
])  # fmt: skip
def test_tpu_warns_about_a_relative_output_dir(tmp_path, yaml_line, overrides, warned):
    config = tmp_path / "c.yaml"
    config.write_text(f"# jaxtune train c.yaml\n{yaml_line}stage: sft\n")
    proc = launch(TPU, "--config", str(config), "--zone", "us-central2-b", "--dry-run", "--", *overrides)
    assert proc.returncode == 0, proc.stderr
    if warned is None:
        assert "warning" not in proc.stderr, proc.stderr
    else:
        assert f"warning: output_dir '{warned}' is relative" in proc.stderr, proc.stderr
        assert "preempted TPU is recreated without it" in proc.stderr


def test_gpu_runs_srun_and_writes_a_valid_sbatch_script(config, tmp_path):
    stub, env = stub_env(tmp_path)
    proc = launch(GPU, "--config", str(config), "--nodes", "2", "--port", "4321", env=env)
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "run.sbatch"
    proc = launch(GPU, "--config", str(config), "--nodes", "2", "--sbatch", str(script), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (stub / "calls").read_text().splitlines() == [
        "srun JAX_COORDINATOR_PORT=4321 --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 "
        f"--job-name=jaxtune python3 -m jaxtune train {config}",
        f"sbatch JAX_COORDINATOR_PORT= {script}",
    ]
    assert subprocess.run([BASH, "-n", str(script)]).returncode == 0  # the generated script parses
    assert "#SBATCH --ntasks-per-node=1" in script.read_text()
