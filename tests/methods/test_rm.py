"""Stage rm end to end: a reward model learns the synthetic preference task (> 90% pairwise accuracy on held-out
pairs), and its export is a `*ForSequenceClassification` directory that transformers scores identically."""

import json
from pathlib import Path

import numpy as np
from alignment_helpers import tiny_run

import jaxtune
from jaxtune.config import load_config
from jaxtune.data.pipeline import iterators
from jaxtune.demo import char_tokenizer
from jaxtune.models.score import sequence_scores
from jaxtune.train.loop import run


def test_reward_model_learns_heldout_preferences_and_exports_for_transformers(tmp_path, preference_files):
    train, heldout = preference_files
    cfg = tiny_run(tmp_path, "rm", [train], data={"eval": [str(heldout)]},
                   training={"max_steps": 120, "warmup_steps": 10, "eval_every": 60, "export_hf": True,
                             "best_metric": "eval_accuracy", "best_mode": "max"})  # fmt: skip
    summary = run(load_config(cfg))
    run_dir = Path(cfg["output_dir"])
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    assert [e["step"] for e in evals] == [60, 120]
    assert evals[-1]["accuracy"] > 0.9, evals
    assert evals[-1]["rewards/chosen"] > evals[-1]["rewards/rejected"]

    # The export: transformers' AutoModelForSequenceClassification gives the same rewards as jaxtune's head,
    # and the same > 90% accuracy on the held-out pairs.
    import torch
    from transformers import AutoModelForSequenceClassification

    export = Path(summary["export"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    tok = char_tokenizer()
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    ours = jaxtune.load_model(export)
    batch = next(
        iter(iterators([str(heldout)], tok, 64, "pair", cutoff_len=48, bucket_multiple=8, shuffle=False).train)
    )
    scores = {}
    for side in ("chosen", "rejected"):
        tb = getattr(batch, side)
        ids = np.where(tb.segment_ids > 0, tb.input_ids, tok.pad_token_id)
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(tb.segment_ids > 0).long())
        hidden = ours.hidden_states(tb.input_ids, segment_ids=tb.segment_ids)
        mine = np.asarray(sequence_scores(ours.arch, ours.params, hidden, tb.segment_ids))
        np.testing.assert_allclose(mine, theirs.logits[:, 0].numpy(), rtol=1e-4, atol=1e-4)
        scores[side] = mine
    assert (scores["chosen"] > scores["rejected"]).mean() > 0.9


def test_lora_reward_model_from_a_sequence_classifier_trains_its_head_and_merges_on_export(
    tmp_path, preference_files
):
    """Base = an HF LlamaForSequenceClassification directory: its `score` head is trained beside the LoRA
    factors (PEFT's modules_to_save) and the export is the merged classifier, loadable by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = char_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "base")
    head0 = np.asarray(jaxtune.load_model(tmp_path / "base").params["score"]["kernel"])
    cfg = tiny_run(tmp_path, "rm", [preference_files[1]], model={"path": str(tmp_path / "base"), "random_init": None},
                   method={"name": "lora", "rank": 4, "target_modules": "all-linear"},
                   training={"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2, "export_hf": True})  # fmt: skip
    summary = run(load_config(cfg))
    export = Path(summary["export"])
    merged = jaxtune.load_model(export)
    assert not np.allclose(np.asarray(merged.params["score"]["kernel"]), head0)  # the head trained
    base = jaxtune.load_model(tmp_path / "base")
    q = ("layers", "self_attn", "q_proj", "kernel")
    get = lambda p: np.asarray(p[q[0]][q[1]][q[2]][q[3]])
    assert not np.allclose(get(merged.params), get(base.params))  # LoRA merged into the kernels
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    ids = np.array([[10, 11, 12, 13, 14, 0, 0], [20, 21, 22, 23, 24, 25, 26]])
    mask = (np.arange(7) < np.array([[5], [7]])).astype(np.int64)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    mine = sequence_scores(merged.arch, merged.params, merged.hidden_states(ids, attention_mask=mask), mask)
    np.testing.assert_allclose(np.asarray(mine), theirs, rtol=1e-4, atol=1e-5)
