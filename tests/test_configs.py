"""Every shipped YAML under configs/ is valid, starts with its command, and — when it names a model family in its
file name (`configs/<stage>/<family>_<method>.yaml`) — trains for 2 steps with its own settings, only the model
swapped for a tiny local model of that family, the data for a small local file of the stage's kind, and the
run shortened. A run that completes is not enough: both logged losses must be finite and every trainable leaf
must differ from its initial value (an update that never lands — a mask that freezes everything, a zero
learning rate, a gradient that never reaches an adapter — completes 2 steps just as well). RL stages (ppo, grpo)
are only validated here; their own tests run them and check their rewards, KL and losses."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from tiny_models import FAMILIES, save_hf

from jaxtune import demo
from jaxtune.config import load_config
from jaxtune.train.loop import train
from jaxtune.train.run import build_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
RUNNABLE_STAGES = ("pt", "sft", "rm", "dpo", "kto")


def family_of(path: str) -> str | None:
    """The longest tiny-model family the file name starts with (`qwen3_moe_lora` is qwen3_moe, not qwen3)."""
    stem = Path(path).stem
    hits = [f for f in FAMILIES if stem == f or stem.startswith(f + "_")]
    return max(hits, key=len) if hits else None


def test_configs_exist_for_every_family_and_stage():
    families = {family_of(p) for p in CONFIGS} - {None}
    assert families >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "mixtral",
                        "qwen2_moe", "qwen3_moe"}, sorted(families)  # fmt: skip
    stages = {Path(p).parent.name for p in CONFIGS}
    assert stages >= {"sft", "pt"}, sorted(stages)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_is_valid_and_documented(path):
    text = (REPO / path).read_text()
    assert text.startswith("# jaxtune "), f"{path}: the first line must be the command that runs it"
    cfg = load_config(REPO / path)
    parent = Path(path).parent.name
    if parent != "configs":
        assert cfg.stage == parent or (parent == "sft" and cfg.stage == "sft"), (path, cfg.stage)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfgdata")
    samples = demo.samples(64, seed=0)
    (d / "sft.json").write_text(json.dumps(samples))
    (d / "text.txt").write_text("\n".join(f"{s['input']} {s['output']} {s['instruction']}" for s in samples))
    pref = [{"instruction": s["instruction"], "input": s["input"], "chosen": s["output"], "rejected": s["input"]}
            for s in samples]  # fmt: skip
    (d / "pref.json").write_text(json.dumps(pref))
    kto = [{"messages": [{"role": "user", "content": s["instruction"] + " " + s["input"]},
                         {"role": "assistant", "content": s["output"] if i % 2 else s["input"]}], "label": bool(i % 2)}
           for i, s in enumerate(samples)]  # fmt: skip
    (d / "kto.json").write_text(json.dumps(kto))
    return {"pt": d / "text.txt", "sft": d / "sft.json", "rm": d / "pref.json", "dpo": d / "pref.json",
            "kto": d / "kto.json"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            save_hf(family, made[family], max_position_embeddings=128) if family != "gpt2" else save_hf(
                family, made[family], n_positions=128
            )
        return made[family]

    return get


def _update(tree: dict, dotted: dict) -> dict:
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p), dict) or p not in node else node[p]
        node[leaf] = value
    return tree


@pytest.mark.parametrize("path", [p for p in CONFIGS if family_of(p)])
def test_config_trains_two_steps(path, tmp_path, local_data, tiny_dirs):
    raw = yaml.safe_load((REPO / path).read_text())
    cfg = load_config(REPO / path)
    if cfg.stage not in RUNNABLE_STAGES:
        pytest.skip(f"stage {cfg.stage} runs in its own tests")
    data = local_data["kto" if cfg.stage == "dpo" and cfg.dpo.loss_type == "kto" else cfg.stage]
    raw = _update(raw, {
        "output_dir": str(tmp_path / "run"), "model.path": str(tiny_dirs(family_of(path))),
        "model.tokenizer": "builtin:chars", "model.dtype": "float32", "model.param_dtype": "float32",
        "model.attention_impl": "xla", "data.train": [str(data)], "data.eval": [], "data.val_size": 0,
        "data.dataset_dir": None, "data.cutoff_len": 64, "data.streaming": False, "training.max_steps": 2,
        "training.batch_size": 2, "training.micro_batch_size": None, "training.eval_every": 0,
        "training.save_every": 0, "training.export_hf": False, "training.eval_generate": 0,
        "parallel": {}, "logging": {"progress": False, "tensorboard": False, "plot": False, "log_every": 1},
    })  # fmt: skip
    built = build_run(load_config(raw))
    # host copies: the step donates the state's buffers
    initial = jax.tree.map(lambda x: np.array(x, copy=True), built.state.trainable)
    summary = train(built)
    assert summary["stop_reason"] == "completed" and summary["step"] == 2
    rows = [
        json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 2 and np.isfinite(losses).all(), losses
    unchanged = [
        jax.tree_util.keystr(key)
        for (key, before), after in zip(
            jax.tree_util.tree_leaves_with_path(initial), jax.tree.leaves(built.state.trainable)
        )
        if np.array_equal(before, np.asarray(after))
    ]
    assert not unchanged, f"{path}: trainable leaves that 2 steps did not change: {unchanged}"
