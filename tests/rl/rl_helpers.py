"""The RL tests' task and helpers (conftest.py trains the starting policy): upper-case a two-letter word.

The starting policy is SFT'd for 100 steps on answers that are upper-case only half the time (the rest repeat
the word as given), so it can produce the right answer but picks it about half the time: RL with the
exact-match reward then has a clear margin to gain, and nothing new to learn but which of its answers to prefer.
"""

import json
import random

LETTERS = "abcdefgh"


def rows(n: int, seed: int, noise: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(2))
        out.append({"instruction": word, "output": word if rng.random() < noise else word.upper()})
    return out


QUIET = {"log_every": 1, "progress": False, "tensorboard": False, "plot": False}


def rl_config(task, out, stage: str, method: dict, **sections) -> dict:
    """An RL run on the task: the SFT'd model, clean prompts with reference answers, greedy eval on 64."""
    cfg = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"path": str(task.model), "tokenizer": "builtin:chars"},
        "data": {
            "train": [str(task.prompts)],
            "eval": [str(task.eval)],
            "cutoff_len": 16,
            "bucket_multiple": 8,
        },
        "method": method,
        "training": {"lr_scheduler": "constant", "save_every": 0, "eval_generate": 64},
        "generation": {"max_new_tokens": 4, "temperature": 0.7},
        "logging": QUIET,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
