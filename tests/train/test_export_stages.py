"""`jaxtune export` of a finished run of every stage, in every mode, checked against jaxtune's own outputs.

Each run trains 2 steps (RL: 2 iterations) of a tiny Llama loaded from a local HF directory, so the exports
name a base `transformers` can load. jaxtune's side is the run rebuilt from its directory and checkpoint
(`train.run.load_run`, what `jaxtune generate --model RUN_DIR` uses); the other side is what users load:

- adapter methods: `--adapter` (also the default form) in `peft.PeftModel`, `--merge` in plain `transformers`;
- full fine-tuning: the default form / `--merge` in `transformers`; `--adapter` is refused in one line;
- rm: the default form / `--merge` in `AutoModelForSequenceClassification` (scores), `--adapter` as a PEFT
  SEQ_CLS adapter (`modules_to_save=["score"]`) over the base, with the same scores;
- ppo: the policy only (the value model's head and LoRA are not part of the export);
- grpo: a finished RL run also writes curves.png, with reward and KL panels.
"""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import hf_logits, save_hf

from jaxtune import cli, demo
from jaxtune.config import load_config
from jaxtune.models.decoder import Decoder
from jaxtune.models.score import sequence_scores
from jaxtune.peft import merge_variables
from jaxtune.train.loop import run as train
from jaxtune.train.run import load_run

IDS = np.random.RandomState(0).randint(5, 90, (2, 9))  # no special / pad ids: HF pools the last non-pad token
LORA = {"name": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
QUIET = {"log_every": 1, "progress": False, "tensorboard": False, "plot": False}


def _pairs(n: int, seed: int) -> list[dict]:
    rows = []
    for s in demo.samples(n, seed, min_len=3, max_len=6):
        answer = s["output"]
        rows.append({"prompt": f"{s['instruction']} {s['input']}", "chosen": answer, "rejected": answer[1:]})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    hf = save_hf("llama", root / "base", max_position_embeddings=128)
    files = {
        "text": root / "text.jsonl",
        "sft": root / "sft.json",
        "pairs": root / "pairs.json",
        "kto": root / "kto.json",
        "prompts": root / "prompts.json",
    }
    samples = demo.samples(16, seed=0)
    files["text"].write_text("\n".join(json.dumps({"text": s["input"] * 6}) for s in samples))
    files["sft"].write_text(json.dumps(samples))
    pairs = _pairs(16, seed=1)
    files["pairs"].write_text(json.dumps(pairs))
    kto = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "label": bool(i % 2)}
           for i, p in enumerate(pairs)]  # fmt: skip
    files["kto"].write_text(json.dumps(kto))
    files["prompts"].write_text(json.dumps([{"instruction": s["instruction"] + " " + s["input"],
                                             "output": s["output"]} for s in samples]))  # fmt: skip
    return root, hf, files


def spread(prompts, completions, answers) -> list[float]:
    """A GRPO reward that differs between any two different completions: the group-relative advantages are
    never all zero, so two iterations always move the adapter (a random model's 4-token answers rarely match a
    reference by even one character, and char_match then rewards every sample 0)."""
    return [sum(map(ord, c)) / 1000 for c in completions]


CASES = {  # name -> (stage, data file, method, extra sections)
    "pt_full": ("pt", "text", {"name": "full"}, {}),
    "sft_full": ("sft", "sft", {"name": "full"}, {}),
    "sft_lora": ("sft", "sft", LORA, {}),
    "rm_lora": ("rm", "pairs", LORA, {}),
    "dpo_lora": ("dpo", "pairs", LORA, {}),
    "kto_lora": ("kto", "kto", LORA, {}),
    "ppo_lora": ("ppo", "prompts", LORA, {"ppo": {"reward_fn": "char_match"}}),
    "grpo_lora": ("grpo", "prompts", LORA, {"grpo": {"reward_fns": [f"{__name__}:spread"], "num_generations": 2},
                                            "logging": {**QUIET, "plot": True}}),  # fmt: skip
}


def _train(base, name: str):
    root, _, files = base
    stage, data, method, extra = CASES[name]
    cfg = {
        "stage": stage,
        "output_dir": str(root / name),
        "model": {"path": str(root / "base"), "tokenizer": "builtin:chars"},
        "data": {"train": [str(files[data])], "cutoff_len": 32, "bucket_multiple": 8},
        "method": method,
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 2e-2, "save_every": 0, "export_hf": False},
        "generation": {"max_new_tokens": 4},
        "logging": QUIET,
        **extra,
    }
    train(load_config(cfg))
    return root / name


def _jaxtune_outputs(run_dir, scores: bool = False) -> np.ndarray:
    """Logits (or RM scores) of IDS under the run as jaxtune restores it."""
    run, _ = load_run(run_dir)
    variables = merge_variables(run.frozen, run.policy_trainable)
    arch = run.lm.arch
    ids = jnp.asarray(IDS)
    seg = jnp.ones_like(ids)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = Decoder(arch).apply(variables, ids, seg, pos)
    if scores:
        return np.asarray(sequence_scores(arch, variables["params"], hidden, seg))
    return np.asarray(Decoder(arch).apply(variables, hidden, method=Decoder.logits))


def _export(run_dir, out, *flags) -> int:
    return cli.main(["export", str(run_dir), *flags, "--out", str(out)])


def _lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("name", ["pt_full", "sft_full"])
def test_full_runs_export_a_model(base, name, tmp_path, capsys):
    run_dir = _train(base, name)
    ours = _jaxtune_outputs(run_dir)
    _, hf, _ = base
    assert np.abs(ours - hf_logits(hf, IDS)).max() > 1e-3  # training changed the model
    for flags in ((), ("--merge",)):
        out = tmp_path / ("merge" if flags else "auto")
        assert _export(run_dir, out, *flags) == 0
        np.testing.assert_allclose(hf_logits(_lm(out), IDS), ours, atol=2e-4, rtol=0)
    capsys.readouterr()
    assert _export(run_dir, tmp_path / "adapter", "--adapter") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # after the run's own log lines
    assert err.startswith("jaxtune: error:") and "trains base parameters" in err


@pytest.mark.parametrize("name", ["sft_lora", "dpo_lora", "kto_lora", "ppo_lora", "grpo_lora"])
def test_adapter_runs_export_adapter_and_merged_model(base, name, tmp_path):
    from peft import PeftModel

    run_dir = _train(base, name)
    ours = _jaxtune_outputs(run_dir)
    _, hf, _ = base
    assert np.abs(ours - hf_logits(hf, IDS)).max() > 1e-4  # the adapter moved away from B = 0
    for flags, out in (((), tmp_path / "auto"), (("--adapter",), tmp_path / "adapter")):
        assert _export(run_dir, out, *flags) == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
        np.testing.assert_allclose(hf_logits(peft_model, IDS), ours, atol=2e-4, rtol=0)
    assert _export(run_dir, tmp_path / "merged", "--merge") == 0
    np.testing.assert_allclose(hf_logits(_lm(tmp_path / "merged"), IDS), ours, atol=2e-4, rtol=0)
    if name == "grpo_lora":  # an RL run draws its curves too, with reward and KL to the reference
        from jaxtune.train import plot

        assert (run_dir / "curves.png").stat().st_size > 0
        drawn = {n for _, names in plot.panels(plot.load_metrics(run_dir)) for n in names}
        assert {"loss", "reward", "kl"} <= drawn, drawn
    if name == "ppo_lora":  # the value model (its own LoRA and score head) stays out of the policy's export
        from safetensors.numpy import load_file

        names = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
        assert not any("score" in n or "value" in n for n in names)


def test_rm_run_exports_a_sequence_classifier_and_a_seq_cls_adapter(base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir = _train(base, "rm_lora")
    ours = _jaxtune_outputs(run_dir, scores=True)  # [2]
    root, _, _ = base

    def score(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(IDS)).logits[:, 0].float().numpy()

    for flags in ((), ("--merge",)):
        out = tmp_path / ("merge" if flags else "auto")
        assert _export(run_dir, out, *flags) == 0
        np.testing.assert_allclose(score(AutoModelForSequenceClassification.from_pretrained(out).eval()), ours,
                                   atol=2e-4, rtol=0)  # fmt: skip
    assert _export(run_dir, tmp_path / "adapter", "--adapter") == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    seq_cls = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=1)
    seq_cls.config.pad_token_id = 0
    with_adapter = PeftModel.from_pretrained(seq_cls, tmp_path / "adapter").eval()
    np.testing.assert_allclose(score(with_adapter), ours, atol=2e-4, rtol=0)
