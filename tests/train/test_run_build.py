"""The run as a value and the method as a record: what `build_run` / `load_run` guarantee to every consumer.

- `methods.METHODS` holds one `Method` record per `config.Stage` value, and nothing else;
- `jaxtune estimate` counts the parameters training builds (the tokenizer's vocabulary, not a default one);
- `jaxtune generate --model RUN_DIR` answers from the run's checkpoint, rebuilt by `load_run`;
- a damaged latest checkpoint: resume falls back to the one before, export says which step in one line;
- a DPO run with precomputed reference log-probs evaluates padded eval batches (a shipped config crashed);
- the CLI prints every `JaxtuneError` as one paragraph and exits 2, and keeps the traceback of anything else.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
from methods.alignment_helpers import preference_pairs, tiny_run

from jaxtune import cli, demo
from jaxtune.config import RunConfig, Stage, load_config
from jaxtune.errors import JaxtuneError
from jaxtune.methods import METHODS, Method
from jaxtune.train.loop import run as train
from jaxtune.train.run import build_run, load_run

REPO = Path(__file__).resolve().parents[2]


def test_one_method_record_per_stage():
    assert set(METHODS) == set(typing.get_args(Stage))
    for stage, method in METHODS.items():
        assert isinstance(method, Method) and method.name == stage
        assert (method.rl is not None) == (method.data_kind == "prompt")
    assert RunConfig().stage in METHODS


def test_estimate_counts_what_training_builds(capsys):
    from jaxtune.estimate import estimate
    from jaxtune.train import setup

    cfg = load_config(REPO / "configs" / "demo.yaml")
    out = estimate(cfg, compile=False)
    model = setup.build_model(cfg)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(model.params))
    assert out["base_params"] == n == out["trainable_params"]  # full fine-tuning of the demo model
    assert model.arch.vocab_size == len(model.tokenizer) < 32000


def _sft_run(tmp_path, **training) -> dict:
    (tmp_path / "sft.json").write_text(json.dumps(demo.samples(24, seed=0)))
    return tiny_run(tmp_path, "sft", [tmp_path / "sft.json"], training={"batch_size": 4, **training})


def _damage(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.name not in ("commit_success.txt",):
            f.write_bytes(b"\x00garbage")


def test_generate_from_a_run_and_a_damaged_latest_checkpoint(tmp_path, capsys):
    cfg = _sft_run(tmp_path, max_steps=2, save_every=1)
    train(load_config(cfg))
    # generate answers from the run's checkpoint, rebuilt by load_run
    run, step = load_run(cfg["output_dir"])
    assert step == 2 and int(run.state.step) == 2
    assert cli.main(["generate", "--model", cfg["output_dir"], "--prompt", "Reverse the word.\nabc",
                     "--max-new-tokens", "3", "--temperature", "0", "--jsonl"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"prompt", "completion"} <= set(row)
    # damage the latest checkpoint: export names it in one line, resume continues from the one before
    ckpts = Path(cfg["output_dir"]) / "checkpoints"
    _damage(ckpts / "2")
    capsys.readouterr()
    assert cli.main(["export", str(ckpts / "2"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's own log lines
    assert err.startswith("jaxtune: error:") and "checkpoints/2" in err and "Traceback" not in err
    # resuming loses only the damaged step: it continues from step 1 and finishes
    cfg["training"]["max_steps"] = 3
    summary = train(load_config(cfg))
    assert summary["step"] == 3 and summary["stop_reason"] == "completed"
    rows = [json.loads(x) for x in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"][-2:] == [2, 3]  # step 2 trained again


def test_dpo_precomputed_reference_evaluates_a_padded_last_batch(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(preference_pairs(23, seed=0)))
    cfg = tiny_run(tmp_path, "dpo", [tmp_path / "pairs.json"], method={"name": "full"},
                   data={"val_size": 7}, dpo={"precompute_ref_log_probs": True},
                   training={"batch_size": 4, "max_steps": 2, "eval_every": 1})  # fmt: skip
    summary = train(load_config(cfg))
    assert summary["stop_reason"] == "completed"
    rows = [json.loads(x) for x in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and all(math.isfinite(r["loss"]) for r in evals)


def test_cli_prints_jaxtune_errors_in_one_paragraph_and_keeps_other_tracebacks(monkeypatch, capsys):
    import jaxtune.train.loop as loop

    def user_error(cfg):
        raise JaxtuneError("what was wrong, where, and what to do")

    monkeypatch.setattr(loop, "run", user_error)
    assert cli.main(["train", str(REPO / "configs" / "demo.yaml")]) == 2
    assert capsys.readouterr().err == "jaxtune: error: what was wrong, where, and what to do\n"

    def bug(cfg):
        raise ValueError("an internal invariant broke")  # raised inside jaxtune, but not a JaxtuneError

    monkeypatch.setattr(loop, "run", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["train", str(REPO / "configs" / "demo.yaml")])


def test_abstract_run_has_the_trained_tree_of_every_stage_and_reads_no_data(tmp_path):
    """The restore target of each stage: the trainable tree the loop trains (shapes only), with no data read."""
    expected = {"rm": {"params"}, "ppo": {"lora", "value"}}
    for stage in METHODS:
        cfg = tiny_run(tmp_path, stage, [tmp_path / "missing.json"], method={"name": "lora", "rank": 2},
                       ppo={"reward_fn": "exact_match"}, grpo={"reward_fns": ["exact_match"]})  # fmt: skip
        run = build_run(load_config(cfg), abstract=True, weights=False)
        leaves = jax.tree.leaves(run.state.trainable)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
        assert set(run.state.trainable) == expected.get(stage, {"lora"}) | ({"lora"} if stage == "rm" else set())
        assert np.all([x.dtype == np.float32 for x in leaves])
