"""Stage dpo end to end: the shipped demo on LLaMA-Factory's dpo_en_demo.json with a chat template, and the
step's accumulation (micro-batches of pairs) equal to one big batch."""

import json
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest
from alignment_helpers import SHARED

from jaxtune import data, peft
from jaxtune.config import load_config
from jaxtune.data.pipeline import build
from jaxtune.demo import CHARS, char_tokenizer
from jaxtune.methods import dpo
from jaxtune.methods.forward import LM
from jaxtune.models.hf import from_hf_config
from jaxtune.train import optim, state
from jaxtune.train.loop import run
from jaxtune.train.step import make_train_step

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (SHARED / "dpo_en_demo.json").exists(), reason="needs ../shared/data/llamafactory")
def test_dpo_demo_runs_on_dpo_en_demo_with_a_chat_template(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={SHARED}", "data.cutoff_len=128", "training.max_steps=3",
        "training.eval_steps=1", "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false",
        "logging.plot=false",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs/dpo/demo.yaml", overrides)

    # each pair is a chat-templated conversation: the character tokenizer's Jinja template marks the turns, and
    # only the response (with its end-of-turn EOS) is trained
    tok = char_tokenizer()
    records = data.load(cfg.data.train[0], dataset_dir=cfg.data.dataset_dir)
    plain = lambda r: all(c in CHARS for m in (*r.prompt, *r.chosen) for c in m.content)  # no <unk> in decode
    record = next(r for r in records if plain(r))
    (ids, labels), _ = data.encode(record, tok)
    assert tok.decode(ids).startswith("<|user|>" + record.prompt[0].content + "<|assistant|>")
    assert tok.decode([t for t in labels if t != -100]) == record.chosen[0].content + "</s>"

    summary = run(cfg)
    assert summary["stop_reason"] == "completed" and summary["step"] == 3
    rows = [
        json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    # step 1: the policy is the reference (a frozen copy under full fine-tuning), so z = 0 and L = log 2
    assert train[1]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert abs(train[1]["margins"]) < 1e-5  # (two separately compiled forward passes: float noise only)
    keys = {"rewards/chosen", "rewards/rejected", "margins", "accuracy", "logps/chosen", "logps/rejected"}
    assert keys <= set(train[3]) and all(math.isfinite(train[3][k]) for k in keys)
    assert train[3]["logps/chosen"] < 0 and train[3]["loss"] != train[1]["loss"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and keys <= set(evals[-1])
    assert (Path(summary["export"]) / "config.json").exists()


def test_accumulation_equals_one_big_batch(preference_files):
    """Two steps on 4 pairs, and on the same 4 pairs as 2 micro-batches of 2: same loss, metrics and update."""
    tok = char_tokenizer()
    model = from_hf_config(
        {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, rng=0, tokenizer=tok,
    )  # fmt: skip
    cfg = load_config({"stage": "dpo", "data": {"train": [str(preference_files[1])], "cutoff_len": 48,
                                                "bucket_multiple": 8}})  # fmt: skip
    batch = next(iter(build(cfg.data, tok, 4, "pair").train))
    plan = peft.prepare(model, {"method": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"]}, 0)
    out = []
    for micro in (None, 2):
        c = load_config(
            {"stage": "dpo", "training": {"batch_size": 4, "micro_batch_size": micro, "max_grad_norm": 0}}
        )
        opt, lr = optim.build(c.training, plan.trainable, 10, plan.lr_multipliers)
        step = make_train_step(dpo.DPO, LM(plan.arch), c, opt, lr, accum=c.training.accumulation_steps)
        st = state.create(jax.tree.map(jnp.copy, plan.trainable), opt, seed=0)
        st, _ = step(st, plan.frozen, batch)  # step 1: B = 0, so z = 0; step 2 sees a moved policy
        st, metrics = step(st, plan.frozen, batch)
        out.append((st.trainable, {k: metrics[k] for k in ("loss", "margins", "accuracy", "grad_norm")}))
    chex.assert_trees_all_close(out[0], out[1], rtol=2e-5, atol=1e-6)
