"""The RL tests' shared fixture: the SFT'd starting policy of the task described in rl_helpers.py."""

import json
from types import SimpleNamespace

import pytest
from rl_helpers import QUIET, rows

from jaxtune.config import load_config
from jaxtune.train.loop import run


@pytest.fixture(scope="session")
def rl_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_task")
    files = {"sft": rows(2000, 0, noise=0.5), "prompts": rows(512, 5), "eval": rows(64, 1)}
    for name, data in files.items():
        (d / f"{name}.json").write_text(json.dumps(data))
    sft = {
        "stage": "sft",
        "output_dir": str(d / "sft"),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": True}},
        "data": {"train": [str(d / "sft.json")], "cutoff_len": 16, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "warmup_steps": 10, "max_steps": 100, "save_every": 0},
        "logging": QUIET,
    }  # fmt: skip
    run(load_config(sft))
    return SimpleNamespace(dir=d, model=d / "sft" / "hf", prompts=d / "prompts.json", eval=d / "eval.json")
