"""What the configure form asks before a run (jaxtune/board/checks.py) answers as a run would: the model
directory's facts from `transformers` itself, the same errors for a directory that is not a model, the local
dataset names of a LLaMA-Factory `dataset_info.json`, a preview whose trained tokens are exactly the answer,
and `jaxtune estimate`'s own error line. Also: without gradio, `jaxtune board` says which extra to install."""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest
from tiny_models import build_hf, save_hf

from jaxtune import demo
from jaxtune.board import checks
from jaxtune.config import load_config
from jaxtune.errors import JaxtuneError, RunError
from jaxtune.models import hf

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "llamafactory"


def test_model_info_reports_what_transformers_counts(chat_dir):
    info = checks.model_info(str(chat_dir))
    n = build_hf("llama").num_parameters()
    assert "`llama`" in info and f"{checks.count_text(n)} parameters" in info
    assert f"({len(demo.char_tokenizer()):,} tokens)" in info and "chat template: found" in info


def test_model_info_without_chat_template_says_what_to_set(tmp_path):
    save_hf("llama", tmp_path)
    tok = demo.char_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert "**none**: set data.template" in checks.model_info(str(tmp_path))


def test_model_info_errors_are_the_runs_errors(tmp_path):
    for make in (lambda d: None, lambda d: (d / "config.json").write_text("{not json"),
                 lambda d: (d / "config.json").write_text(json.dumps({"model_type": "nope"}))):  # fmt: skip
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        make(d)
        with pytest.raises(JaxtuneError) as reference:
            hf.arch_of(d, hf.read_hf_config(d))
        with pytest.raises(JaxtuneError) as board:
            checks.model_info(str(d))
        assert str(board.value) == str(reference.value) and str(d) in str(board.value)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/llamafactory is not beside the checkout")
def test_dataset_names_are_the_local_entries():
    names = checks.dataset_names(str(SHARED))
    info = json.loads((SHARED / "dataset_info.json").read_text())
    assert "alpaca_en_demo" in names and "dpo_en_demo" in names
    assert all((SHARED / info[n]["file_name"]).exists() for n in names)
    assert not any("hf_hub_url" in info[n] and "file_name" not in info[n] for n in names)


def test_dataset_names_errors_name_the_file(tmp_path):
    with pytest.raises(JaxtuneError, match="no dataset_info.json in"):
        checks.dataset_names(str(tmp_path))
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.json"},}')
    with pytest.raises(JaxtuneError, match=r"dataset_info\.json.*line 1"):
        checks.dataset_names(str(tmp_path))


def test_preview_trains_exactly_the_answer():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    page = checks.preview_html(cfg)
    sample = re.search(r"<pre class='jt-sample'>(.*?)</pre>", page, re.S).group(1)
    spans = re.findall(r"<span class='(jt-trained|jt-prompt)'>(.*?)</span>", sample, re.S)
    prompt = "".join(html.unescape(t) for c, t in spans if c == "jt-prompt")
    trained = "".join(html.unescape(t) for c, t in spans if c == "jt-trained")
    task = next(t for t in demo.TASKS if t in prompt)
    word = prompt.split(task)[1].strip().removesuffix("<|assistant|>").strip()
    assert trained == demo.TASKS[task](word) + "</s>"
    assert [c for c, _ in spans] == ["jt-prompt", "jt-trained"]


def test_estimate_failure_is_the_cli_error_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'missing'}}}\n")
    ok, text = checks.estimate_text(str(config), cwd=str(tmp_path))
    assert not ok and text.startswith("jaxtune: error: ") and "missing" in text


def test_board_without_gradio_names_the_extra(monkeypatch):
    from jaxtune.board import server

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(RunError, match=re.escape('pip install -e ".[board]"')):
        server.make_app("runs")
