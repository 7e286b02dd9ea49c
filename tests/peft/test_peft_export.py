"""`jaxtune export` on finished tiny runs: --adapter (PEFT layout), --merge (plain HF model), and the plain form for
full fine-tuning, from a run directory or one checkpoint step; what it writes equals what the run itself exported
and loads in `peft` / `transformers` with matching logits."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import hf_logits, save_hf

from jaxtune import cli, demo
from jaxtune.config import load_config
from jaxtune.models.safetensors_io import SafetensorsReader
from jaxtune.train.loop import run

REPO = Path(__file__).resolve().parents[2]
IDS = np.random.RandomState(0).randint(1, 100, (2, 9))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"hf": (transformers model, dir), "lora": run dir, "full": run dir}: 3 steps each on a tiny Llama."""
    root = tmp_path_factory.mktemp("export_runs")
    hf = save_hf("llama", root / "base", max_position_embeddings=128)
    (root / "sft.json").write_text(json.dumps(demo.samples(16, seed=0)))
    out = {"hf": (hf, root / "base")}
    for method in ("lora", "full"):
        cfg = {
            "output_dir": str(root / method),
            "model": {"path": str(root / "base"), "tokenizer": "builtin:chars"},
            "data": {"train": [str(root / "sft.json")], "cutoff_len": 32, "bucket_multiple": 8},
            "method": {"name": method, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "save_every": 0},
            "logging": {"progress": False, "tensorboard": False, "plot": False},
        }
        assert run(load_config(cfg))["step"] == 3
        out[method] = root / method
    return out


def tensors(directory) -> dict:
    reader = SafetensorsReader(directory)
    return {name: np.asarray(reader.get(name)) for name in reader.names()}


def test_adapter_and_merge_from_a_lora_run(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = runs["lora"]
    assert cli.main(["export", str(run_dir), "--adapter", str(tmp_path / "adapter")]) == 0
    written = tensors(tmp_path / "adapter")
    assert written.keys() == tensors(run_dir / "adapter").keys()
    for name, value in tensors(run_dir / "adapter").items():  # the run's own export, from the same state
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in written.items() if "lora_B" in k)  # trained away from B = 0
    assert (tmp_path / "adapter" / "tokenizer_config.json").exists()

    step = sorted((run_dir / "checkpoints").iterdir())[-1]  # the step-directory form
    assert cli.main(["export", str(step), "--merge", str(tmp_path / "merged")]) == 0
    hf, _ = runs["hf"]
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, IDS), hf_logits(with_adapter, IDS), atol=1e-4, rtol=0)
    assert np.abs(hf_logits(merged, IDS) - hf_logits(hf, IDS)).max() > 1e-4


def test_plain_export_of_a_full_run(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = runs["full"]
    assert cli.main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "model")]) == 0
    written = tensors(tmp_path / "model")
    for name, value in tensors(run_dir / "hf").items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    hf, _ = runs["hf"]
    assert (
        np.abs(hf_logits(model, IDS) - hf_logits(hf, IDS)).max() > 1e-4
    )  # the trained weights, not the base
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--adapter", str(tmp_path / "x")]) == 2
    assert "trains base parameters" in capsys.readouterr().err


def test_export_errors_and_help(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--adapter", str(tmp_path / "x")]) == 2
    assert "not a jaxtune run directory" in capsys.readouterr().err
    out = subprocess.run(
        [sys.executable, "-m", "jaxtune", "export", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0
    for word in ("RUN_DIR", "--adapter [DIR]", "--merge [DIR]", "--out DIR", "--config"):
        assert word in out.stdout
