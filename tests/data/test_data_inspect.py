"""`jaxtune data inspect CONFIG` via the CLI: one-line errors for a missing tokenizer; samples in real text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxtune import cli
from jaxtune.data.inspect import highlight

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: ") and err.count("\n") == 1, err  # no traceback
    return err


def test_missing_model_path_is_one_line_naming_the_field(capsys):
    config = REPO / "configs" / "sft" / "qwen2_full.yaml"
    if Path("/models/Qwen2.5-0.5B-Instruct").exists():
        pytest.skip("the model of this config is installed here")
    assert cli.main(["data", "inspect", str(config)]) == 2
    err = _one_line_error(capsys)
    assert "model.path '/models/Qwen2.5-0.5B-Instruct' is not a directory" in err and "model.tokenizer" in err


def test_missing_tokenizer_is_one_line_naming_the_field(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{tokenizer: {tmp_path / 'nowhere'}}}\ndata: {{train: [x.json]}}\n")
    assert cli.main(["data", "inspect", str(config)]) == 2
    assert f"model.tokenizer '{tmp_path / 'nowhere'}': no tokenizer loads from it" in _one_line_error(capsys)


def test_demo_samples_show_the_real_text(capsys):
    """The demo's character tokenizer: spaces and newlines of the prompt appear as they are in the data."""
    assert cli.main(["data", "inspect", str(REPO / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    sample = r"<\|user\|>(Reverse|Uppercase) the word\.\n([a-h]{5})<\|assistant\|>\[\[([a-hA-H]{5})</s>\]\]"
    found = re.findall(sample, out)
    assert len(found) == 3, out  # three samples, not stuck together
    for task, word, answer in found:
        assert answer == (word[::-1] if task == "Reverse" else word.upper())


def test_highlight_keeps_the_space_that_starts_a_span():
    """A SentencePiece-style (Metaspace) tokenizer drops a piece's leading space when the piece is decoded at
    the start of a text: each span is decoded as part of the whole sequence instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581hello": 1, "\u2581world": 2, "\u2581again": 3}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    ids = tok.encode("hello world again", add_special_tokens=False)
    assert ids == [1, 2, 3] and tok.decode(ids[1:]) == "world again"  # the space is lost decoded alone
    assert highlight(ids, [0, 1, 1], tok, color=False) == "hello[[ world again]]"
    assert highlight(ids, [1, 0, 1], tok, color=False) == "[[hello]] world[[ again]]"
