"""Exact token-level label masks, checked by decoding the trained spans, with two real-style Jinja templates.

Oracle: the trained spans of a chat sample are exactly each assistant turn's content plus its end-of-turn
token (what the model must generate), never the generation prompt before it, the newline after it, nor any
system/user/tool-result token. The whole sequence must decode to the tokenizer's own `apply_chat_template`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune import data
from jaxtune.data.records import Conversation, Message, Preference
from jaxtune.data.tokenize import IGNORE, encode_example

END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def trained_spans(ids, labels, tok) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i, "labels are unshifted: labels[i] is ids[i] where trained"
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def hf_render(tok, msgs, tools=None) -> str:
    return tok.apply_chat_template(msgs, tools=tools, tokenize=False)


def name_of(tok) -> str:
    return "llama3" if tok.bos_token == "<|begin_of_text|>" else "chatml"


def conv(*pairs, system=None, tools=None):
    return Conversation(
        tuple(Message(r, c) for r, c in pairs), system=system, tools=tools, file="t.json", row=0
    )


def test_single_turn(chat_tok):
    rec = conv(("user", "What is the capital of France?"), ("assistant", "Paris is the capital."))
    ids, labels = data.encode(rec, chat_tok)
    end = END[name_of(chat_tok)]
    assert trained_spans(ids, labels, chat_tok) == [f"Paris is the capital.{end}"]
    msgs = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
    assert chat_tok.decode(ids) == hf_render(chat_tok, msgs)
    # The whole-string tokenisation is the tokenizer's own: same ids as tokenising the rendered text.
    assert ids == chat_tok(hf_render(chat_tok, msgs), add_special_tokens=False)["input_ids"]


def test_multi_turn_and_system(chat_tok):
    rec = conv(
        ("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Write a poem."), ("assistant", "The sea is wide."),
        system="You are a poet.",
    )  # fmt: skip
    end = END[name_of(chat_tok)]
    ids, labels = data.encode(rec, chat_tok)
    assert trained_spans(ids, labels, chat_tok) == [f"Hello! How can I help?{end}", f"The sea is wide.{end}"]
    text = chat_tok.decode(ids)
    assert "You are a poet." in text and text.startswith(chat_tok.bos_token or "<|im_start|>system")
    # mask_history: only the last assistant turn is trained.
    ids2, labels2 = data.encode(rec, chat_tok, mask_history=True)
    assert ids2 == ids
    assert trained_spans(ids2, labels2, chat_tok) == [f"The sea is wide.{end}"]
    # train_on_prompt: every token is a target.
    _, labels3 = data.encode(rec, chat_tok, train_on_prompt=True)
    assert labels3 == ids


GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"celsius": 20}'},
        {"from": "gpt", "value": "It is 20 degrees in Paris."},
    ],
    "tools": '[{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}]',
}


def test_tools_and_function_call(chat_tok, tmp_path):
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps([GLAIVE_ROW]))
    (rec,) = data.load(str(path), format="sharegpt")
    assert [m.role for m in rec.messages] == ["user", "function_call", "observation", "assistant"]
    ids, labels = data.encode(rec, chat_tok)
    spans = trained_spans(ids, labels, chat_tok)
    name = name_of(chat_tok)
    if name == "chatml":
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    else:
        call = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert spans == [call, f"It is 20 degrees in Paris.{END[name]}"]
    text = chat_tok.decode(ids)
    assert '"description": "Weather of a city"' in text  # tool specs rendered, untrained
    assert '{"celsius": 20}' in text and '{"celsius": 20}' not in "".join(spans)


def test_preference_pair_shares_prompt(chat_tok):
    rec = Preference(
        (Message("user", "Pick a colour."),), (Message("assistant", "Blue."),), (Message("assistant", "No."),),
        system="Be brief.", file="p.json", row=0,
    )  # fmt: skip
    (c_ids, c_lab), (r_ids, r_lab) = data.encode(rec, chat_tok)
    end = END[name_of(chat_tok)]
    assert trained_spans(c_ids, c_lab, chat_tok) == [f"Blue.{end}"]
    assert trained_spans(r_ids, r_lab, chat_tok) == [f"No.{end}"]
    p = next(i for i, lab in enumerate(c_lab) if lab != IGNORE)
    assert c_ids[:p] == r_ids[:p] and all(lab == IGNORE for lab in r_lab[:p])


def test_loss_weight_honoured(chat_tok, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "skip me", "loss_weight": 0.0},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "double me", "loss_weight": 2.0},
        ]
    }
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (rec,) = data.load(path)
    ids, labels = data.encode(rec, chat_tok)
    assert trained_spans(ids, labels, chat_tok) == [f"double me{END[name_of(chat_tok)]}"]
    ex = encode_example(rec, chat_tok)
    assert set(np.unique(ex.weights).tolist()) == {0.0, 2.0}


@pytest.mark.parametrize(
    "name, expected, spans",
    [
        (
            "chatml",
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
            ["A1<|im_end|>", "A2<|im_end|>"],
        ),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            "A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
            ["A1<|eot_id|>", "A2<|eot_id|>"],
        ),
        (
            "llama2",
            "<|begin_of_text|>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 <|endoftext|>"
            "<|begin_of_text|>[INST] Q2 [/INST] A2 <|endoftext|>",
            [" A1 <|endoftext|>", " A2 <|endoftext|>"],
        ),
        (
            "mistral",
            "<|begin_of_text|>[INST] S\n\nQ1 [/INST]A1<|endoftext|>[INST] Q2 [/INST]A2<|endoftext|>",
            ["A1<|endoftext|>", "A2<|endoftext|>"],
        ),
        (
            "gemma",
            "<|begin_of_text|><start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
            "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
            ["A1<end_of_turn>", "A2<end_of_turn>"],
        ),
        (
            "alpaca",
            "<|begin_of_text|>S\n\n### Instruction:\nQ1\n\n### Response:\nA1<|endoftext|>\n\n"
            "### Instruction:\nQ2\n\n### Response:\nA2<|endoftext|>\n\n",
            ["A1<|endoftext|>", "A2<|endoftext|>"],
        ),
        (
            "vicuna",
            "<|begin_of_text|>S USER: Q1 ASSISTANT: A1<|endoftext|>USER: Q2 ASSISTANT: A2<|endoftext|>",
            [" A1<|endoftext|>", " A2<|endoftext|>"],
        ),
    ],
)
def test_named_templates(base_tok, name, expected, spans):
    rec = conv(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"), system="S")
    ids, labels = data.encode(rec, base_tok, template=name)
    assert base_tok.decode(ids) == expected
    assert trained_spans(ids, labels, base_tok) == spans


@pytest.mark.parametrize("name, jinja_fixture", [("chatml", "chatml_tok"), ("llama3", "llama3_tok")])
def test_named_template_matches_jinja(request, name, jinja_fixture):
    """Two independent renderers (Python strings vs the Jinja template) give identical ids and labels."""
    tok = request.getfixturevalue(jinja_fixture)
    rec = conv(
        ("user", "Hi there"),
        ("assistant", "Hello."),
        ("user", "Bye"),
        ("assistant", "Goodbye!"),
        system="Sys",
    )
    assert data.encode(rec, tok, template=name) == data.encode(rec, tok)


def test_template_rewriting_history_falls_back_to_sentinels(make_tok):
    """A Qwen3-like template that drops earlier assistant turns breaks the prefix property."""
    template = (
        "{%- for m in messages %}{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- elif loop.last %}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- else %}{{ '<|im_start|>assistant\\n(hidden)<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = make_tok(template, eos_token="<|im_end|>")
    rec = conv(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"))
    ids, labels = data.encode(rec, tok)
    assert "(hidden)" in tok.decode(ids)
    assert trained_spans(ids, labels, tok) == ["A2<|im_end|>"]


def test_raw_jinja_template_from_config(base_tok, chatml_tok):
    """A Jinja string as `template` renders without touching the tokenizer's own (absent) template."""
    rec = conv(("user", "Q"), ("assistant", "A"))
    ids, labels = data.encode(rec, base_tok, template=chatml_tok.chat_template)
    assert trained_spans(ids, labels, base_tok) == ["A<|im_end|>"] and base_tok.chat_template is None


class NoOffsets:
    """A tokenizer that cannot return offsets, like slow (sentencepiece-only) tokenizers."""

    def __init__(self, tok):
        self.tok = tok
        self.chat_template, self.bos_token, self.eos_token = tok.chat_template, tok.bos_token, tok.eos_token

    def __call__(self, text, return_offsets_mapping=False, **kw):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tok(text, **kw)

    def apply_chat_template(self, *a, **kw):
        return self.tok.apply_chat_template(*a, **kw)


def test_tokenizers_without_offsets_tokenise_by_pieces(chat_tok):
    rec = conv(
        ("user", "Hi"), ("assistant", "Hello there."), ("user", "Bye"), ("assistant", "Goodbye!"), system="S"
    )
    assert data.encode(rec, NoOffsets(chat_tok)) == data.encode(rec, chat_tok)


def test_no_template_is_an_error(base_tok):
    with pytest.raises(ValueError, match="no chat_template"):
        data.encode(conv(("user", "Q"), ("assistant", "A")), base_tok)


def test_text_records_train_every_token_and_end_with_eos(chatml_tok):
    ids, labels = data.encode(data.Text("Some plain text.", file="t.txt", row=0), chatml_tok)
    assert labels == ids and ids[-1] == chatml_tok.eos_token_id


def test_named_template_keeps_nested_tool_schemas_intact(make_tok):
    """The named qwen template renders a tool whose JSON schema nests objects (`}}}` in the text) exactly as
    Qwen2.5's own chat template does (tests/data/templates/qwen2_5.jinja): the spec stays valid JSON."""
    from pathlib import Path

    jinja = (Path(__file__).parent / "templates" / "qwen2_5.jinja").read_text()
    tok = make_tok(jinja, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather {now}",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}]
    rec = data.Conversation(
        tuple(data.Message(m["role"], m["content"]) for m in msgs), None, json.dumps(tools), file="t.jsonl", row=0
    )
    named, own = data.encode(rec, tok, template="qwen"), data.encode(rec, tok)
    assert named == own
    text = tok.decode(named[0])
    spec = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(spec) == tools[0]
    assert text == tok.apply_chat_template(msgs, tools=tools, tokenize=False)
