"""Helpers for the alignment tests: a synthetic preference task with a checkable answer, and tiny run configs.

The task extends jaxtune's demo (reverse or upper-case a word of 3-7 letters). Chosen = the correct answer;
rejected = a corrupted one, half the time the answer to the *other* instruction (so the reward must depend on
the prompt), half the time the correct answer with one letter dropped (so it must compare the answer with the
word).
"""

from __future__ import annotations

import random
from pathlib import Path

from jaxtune import demo

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "llamafactory"


def corrupt(sample: dict, rng: random.Random) -> str:
    answer = sample["output"]
    if rng.random() < 0.5:
        other = next(t for t in demo.TASKS if t != sample["instruction"])
        wrong = demo.TASKS[other](sample["input"])
        if wrong != answer:  # a palindrome in lower case reads the same reversed
            return wrong
    k = rng.randrange(len(answer))
    return answer[:k] + answer[k + 1 :]


def preference_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 100)
    return [
        {"prompt": f"{s['instruction']} {s['input']}", "chosen": s["output"], "rejected": corrupt(s, rng)}
        for s in demo.samples(n, seed, min_len=3, max_len=7)
    ]


def tiny_run(tmp_path, stage: str, train, **sections) -> dict:
    """A run config for a 2-layer Llama (hidden 64) with the character tokenizer and its chat template."""
    cfg = {
        "stage": stage,
        "output_dir": str(tmp_path / "run"),
        "model": {"tokenizer": "builtin:chars", "random_init": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}},
        "data": {"train": [str(t) for t in train], "cutoff_len": 48, "bucket_multiple": 8},
        "method": {"name": "full"},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "save_every": 0, "export_hf": False},
        "logging": {"log_every": 1, "progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg
