"""`pipeline.build` from a DataConfig-like object, for every data kind; eval splits; `inspect.run`; defaults."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

from jaxtune import data
from jaxtune.config import DataConfig
from jaxtune.data import inspect, pipeline
from jaxtune.data.items import DATA_KINDS, Encoder


@dataclasses.dataclass
class DataCfg:
    """Some fields of jaxtune.config.DataConfig (duck-typed: `build` reads them; the rest keep the defaults)."""

    train: list = dataclasses.field(default_factory=list)
    eval: list | None = None
    dataset_dir: str | None = None
    format: str | None = None
    template: str | None = None
    cutoff_len: int = 256
    packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    val_size: float = 0.0
    shuffle: bool = True
    dedup: str = "none"
    streaming: bool = False
    on_error: str = "raise"
    min_length: int | None = None
    bucket_multiple: int = 64
    max_samples: int | None = None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    rows = [
        {"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(21)
    ]
    (d / "alpaca.json").write_text(json.dumps(rows))
    kto = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "label": i % 2 == 0} for i in range(8)]  # fmt: skip
    (d / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    pref = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    (d / "docs.txt").write_text("\n".join(f"document {i} " * (i + 1) for i in range(8)))
    info = {
        "alpaca": {"file_name": "alpaca.json"},
        "pref": {"file_name": "pref.jsonl", "formatting": "preference"},
    }
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def test_sft_with_validation_split(demo, chatml_tok):
    train, ev = pipeline.build(
        DataCfg(train=["alpaca"], dataset_dir=str(demo), val_size=0.25), chatml_tok, 4, "lm"
    )
    assert isinstance(next(train), data.TokenBatch)
    eval_batches = list(ev)
    assert sum(int((b.segment_ids.max(axis=1) > 0).sum()) for b in eval_batches) == 5  # round(0.25 * 21)
    last = eval_batches[-1]
    assert last.input_ids.shape[0] == 4 and (last.loss_mask[1:] == 0).all()  # padded with empty rows
    assert train.steps_per_epoch() == 16 // 4
    ev.reset()  # a second evaluation pass sees the same batches
    for a, b in zip(eval_batches, ev, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_pair_kind(demo, chatml_tok):  # rm, dpo
    train, _ = pipeline.build(DataCfg(train=["pref"], dataset_dir=str(demo)), chatml_tok, 2, "pair")
    b = next(train)
    assert isinstance(b, data.PreferenceBatch) and b.chosen.input_ids.shape == b.rejected.input_ids.shape
    np.testing.assert_array_equal(b.chosen.positions[:, :3], b.rejected.positions[:, :3])


def test_kto_kind(demo, chatml_tok):
    train, _ = pipeline.build(DataCfg(train=[str(demo / "kto.jsonl")], shuffle=False), chatml_tok, 4, "kto")
    b = next(train)
    assert isinstance(b, data.KTOBatch) and b.label.tolist() == [True, False, True, False]


def test_prompt_kind_keeps_reference_answers(demo, chatml_tok):  # ppo, grpo
    train, _ = pipeline.build(
        DataCfg(train=["alpaca"], dataset_dir=str(demo), shuffle=False), chatml_tok, 3, "prompt"
    )
    b = next(train)
    assert isinstance(b, data.PromptBatch) and b.answers == ("Answer 0.", "Answer 1.", "Answer 2.")
    text = chatml_tok.decode(b.prompts.input_ids[0][b.prompts.segment_ids[0] > 0])
    assert text.endswith("<|im_start|>assistant\n") and "Answer 0." not in text
    assert b.prompts.segment_ids[:, -1].all()  # left padded: every prompt ends at the last column


def test_text_kind_and_named_template(demo, base_tok):
    train, _ = pipeline.build(
        DataCfg(train=[str(demo / "docs.txt")], packing=True, cutoff_len=64), base_tok, 2, "text"
    )
    assert next(train).input_ids.shape == (2, 64)
    train, _ = pipeline.build(
        DataCfg(train=["alpaca"], dataset_dir=str(demo), template="alpaca"), base_tok, 2, "lm"
    )
    assert "### Response:" in base_tok.decode(next(train).input_ids[0])


def test_packing_refused_for_pairs(demo, chatml_tok):
    with pytest.raises(ValueError, match="data.packing is for 'text' and 'lm' data"):
        pipeline.build(DataCfg(train=["pref"], dataset_dir=str(demo), packing=True), chatml_tok, 2, "pair")


def test_skip_policy_through_the_pipeline(demo, chatml_tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n{oops\n")
    train, _ = pipeline.build(DataCfg(train=[str(bad)], on_error="skip"), chatml_tok, 1, "lm")
    assert train.report.skipped == {"malformed JSON": 1}
    with pytest.raises(data.DataError, match="row 1"):
        pipeline.build(DataCfg(train=[str(bad)]), chatml_tok, 1, "lm")


def test_inspect_run(demo, chatml_tok):
    out = io.StringIO()
    cfg = DataCfg(train=["alpaca"], dataset_dir=str(demo), dedup="exact", packing=True)
    facts = inspect.run(cfg, chatml_tok, "lm", num_samples=1, out=out, color=True)
    text = out.getvalue()
    assert "records loaded: 21, kept: 21" in text and "token lengths:" in text and "packing:" in text
    assert "\x1b[32mAnswer" in text  # the trained span, in green
    assert facts["examples"] == 21 and facts["packing_efficiency"] > 0
    plain = io.StringIO()
    inspect.run(DataCfg(train=["pref"], dataset_dir=str(demo)), chatml_tok, "pair", out=plain, color=False)
    assert "[chosen]" in plain.getvalue() and "[[good 0<|im_end|>]]" in plain.getvalue()


def test_streaming_with_validation_count(demo, chatml_tok):
    cfg = DataCfg(train=[str(demo / "alpaca.json")], streaming=True, val_size=3, shuffle=False)
    train, ev = pipeline.build(cfg, chatml_tok, 2, "lm")
    seen_eval = [chatml_tok.decode(r[r > 0]) for b in ev for r in b.input_ids if (r > 0).any()]
    assert len(seen_eval) == 3 and "Question number 0?" in seen_eval[0]
    first_train = chatml_tok.decode(next(train).input_ids[0])
    assert "Question number 3?" in first_train  # the first 3 records went to validation
    with pytest.raises(ValueError, match="dedup needs the whole dataset"):
        pipeline.build(
            DataCfg(train=[str(demo / "alpaca.json")], streaming=True, dedup="exact"), chatml_tok, 2, "lm"
        )


def test_inspect_main_for_the_cli(demo, capsys):
    """`jaxtune data inspect CONFIG` calls `inspect.main(run_cfg)`; the tokenizer comes from the model section."""
    pytest.importorskip("jaxtune.demo")
    from types import SimpleNamespace

    cfg = SimpleNamespace(
        stage="sft",
        seed=0,
        data=DataCfg(train=("alpaca",), dataset_dir=str(demo)),
        model=SimpleNamespace(tokenizer="builtin:chars", path=None),
        training=SimpleNamespace(batch_size=4),
    )
    from jaxtune.methods import METHODS

    facts = inspect.main(cfg, METHODS[cfg.stage].data_kind)  # what the CLI passes: the stage's method record
    assert facts["examples"] == 21 and "== 'lm' data ==" in capsys.readouterr().out
    facts = inspect.main(cfg, "prompt")  # the kind the caller names
    out = capsys.readouterr().out
    assert facts["examples"] == 21 and "== 'prompt' data ==" in out and "[answer='Answer 0.']" in out


def test_data_level_max_samples_and_run_seed(demo, chatml_tok):
    cfg = DataCfg(train=("alpaca",), dataset_dir=str(demo), max_samples=5)
    train, _ = pipeline.build(cfg, chatml_tok, 1, "lm", seed=3, epochs=1)
    assert train.seed == 3 and sum(1 for _ in train) == 5


def test_iterators_without_keywords_use_data_config_defaults(demo, chatml_tok):
    """The data layer has no defaults of its own: every unset field is DataConfig()'s."""
    d = DataConfig()
    it = pipeline.iterators(str(demo / "alpaca.json"), chatml_tok, 2, "lm").train
    got = (it.seq_len, it.packing, it.bucket_multiple, it.shuffle)
    assert got == (d.cutoff_len, d.packing, d.bucket_multiple, d.shuffle)
    enc = Encoder(chatml_tok, "lm")
    got = (enc.cutoff_len, enc.min_length, enc.overlength, enc.template)
    assert got == (d.cutoff_len, d.min_length, d.overlength, d.template)
    got = {k: enc.opts[k] for k in ("train_on_prompt", "mask_history", "template_kwargs")}
    assert got == {
        "train_on_prompt": d.train_on_prompt,
        "mask_history": d.mask_history,
        "template_kwargs": {},
    }
    assert enc.rewritten_history == d.rewritten_history and enc.opts["counts"] is enc.report.tokens
    # build reads every DataConfig field of a real DataConfig, and builds the same iterator
    built = pipeline.build(DataConfig(train=(str(demo / "alpaca.json"),)), chatml_tok, 2, "lm").train
    np.testing.assert_array_equal(next(built).input_ids, next(it).input_ids)


def test_iterators_reject_unknown_keywords(demo, chatml_tok):
    with pytest.raises(TypeError, match="unknown keyword 'cutof_len'; did you mean 'cutoff_len'"):
        pipeline.iterators(str(demo / "alpaca.json"), chatml_tok, 2, "lm", cutof_len=64)


def test_kinds_not_stages(demo, chatml_tok):
    assert DATA_KINDS == ("text", "lm", "pair", "kto", "prompt")
    with pytest.raises(ValueError, match="unknown data kind 'sft' \\(one of text, lm, pair, kto, prompt"):
        pipeline.build(DataCfg(train=["alpaca"], dataset_dir=str(demo)), chatml_tok, 2, "sft")
    with pytest.raises(data.DataError, match="a Preference record cannot make a 'lm' item"):
        pipeline.build(DataCfg(train=["pref"], dataset_dir=str(demo)), chatml_tok, 2, "lm")
    # text (continued pre-training) trains every token and collates into the same TokenBatch as lm (SFT)
    record = data.load(str(demo / "alpaca.json"))[0]
    (text,), (lm,) = Encoder(chatml_tok, "text")(record), Encoder(chatml_tok, "lm")(record)
    np.testing.assert_array_equal(text.ids, lm.ids)
    assert text.weights[1:].all() and not lm.weights[: lm.prompt_len].any()
    train, _ = pipeline.build(DataCfg(train=["alpaca"], dataset_dir=str(demo)), chatml_tok, 2, "text")
    assert train.kind == "lm" and isinstance(next(train), data.TokenBatch)
