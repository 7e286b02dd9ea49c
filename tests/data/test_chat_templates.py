"""Chat encoding against the families' real chat templates (vendored in tests/data/templates, see PROVENANCE.md).

Oracles, per template and conversation (tests/data/chat_cases.py: multi-turn English and Chinese, with and
without a system message, reasoning and tools where the family supports them):
- ids: `tokenizer.apply_chat_template(messages, tools=tools)` token for token;
- labels: the assistant mask transformers computes from a `{% generation %}` variant of the same template
  (tests/data/templates/generation/, byte-identical renders), for every turn the template writes the same way
  in history as last; for templates that rewrite history (Qwen3, QwQ), each `rewritten_history` policy
  against that mask on the conversation it trains.
The tokenizer is a small byte-level BPE trained here, carrying every family's special tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import chat_cases
import numpy as np
import pytest

from jaxtune.data import messages as M
from jaxtune.data import pipeline
from jaxtune.data.errors import DataError
from jaxtune.data.records import Conversation
from jaxtune.data.tokenize import encode_examples

HERE = Path(__file__).parent / "templates"
FAMILIES = json.loads((HERE / "families.json").read_text(encoding="utf-8"))
GENERATION = HERE / "generation"
THINK = "<think>\n{r}\n</think>\n\n"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


def train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {s for f in FAMILIES.values() for s in [*f["special_tokens"], f["bos_token"], f["eos_token"]]}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    every = {"system": True, "tools": True, "reasoning": True}
    texts = [m.get("content") or "" for _, msgs, _ in chat_cases.cases_for(every) for m in msgs]
    trainer = trainers.BpeTrainer(
        vocab_size=2500,
        special_tokens=sorted(s for s in specials if s),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer)
    return tok


def family_tok(bpe, name: str, generation: bool = False):
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[name]
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=f["bos_token"], eos_token=f["eos_token"])
    tok.chat_template = ((GENERATION if generation else HERE) / f["file"]).read_text(encoding="utf-8")
    return tok


def record(messages, tools=None) -> Conversation:
    """The record jaxtune loads from an OpenAI `messages` row."""
    msgs = M.parse_messages(messages, dict(M.OPENAI_TAGS), "messages", {"file": "chat.jsonl", "row": 0})
    system, msgs = M.split_system(msgs, "messages", {})
    return Conversation(tuple(msgs), system, json.dumps(tools) if tools else None, file="chat.jsonl", row=0)


def reference_messages(name: str, messages: list) -> list:
    """What the template is given: reasoning stays a field where the template reads one, else it is written
    into the content (jaxtune's documented convention for templates without a reasoning field)."""
    if FAMILIES[name]["reads_reasoning_content"]:
        return messages
    out = []
    for m in messages:
        m = dict(m)
        if m.get("reasoning_content"):
            m["content"] = THINK.format(r=m.pop("reasoning_content")) + m["content"]
        out.append(m)
    return out


def mask_of(gen_tok, messages, tools, kwargs) -> tuple[list[int], list[int]]:
    out = gen_tok.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


CASES = [(name, *case) for name, f in FAMILIES.items() for case in chat_cases.cases_for(f["supports"])]
REWRITES = ("qwen3", "qwq")  # templates that drop earlier turns' reasoning (or write history differently)


@pytest.mark.parametrize("name, case_id, messages, tools", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_ids_and_masks_equal_the_template(bpe, name, case_id, messages, tools):
    if not (GENERATION / FAMILIES[name]["file"]).exists():
        pytest.skip("no {% generation %} variant of this template")
    kw = FAMILIES[name]["render_kwargs"]
    tok, gen = family_tok(bpe, name), family_tok(bpe, name, generation=True)
    ref = reference_messages(name, messages)
    rec = record(messages, tools)
    (whole,) = encode_examples(rec, tok, rewritten_history="as_rendered", template_kwargs=kw)
    ids = tok.apply_chat_template(ref, tools=tools, tokenize=True, return_dict=True, **kw)["input_ids"]
    np.testing.assert_array_equal(whole.ids, ids)
    gen_ids, mask = mask_of(gen, ref, tools, kw)
    np.testing.assert_array_equal(gen_ids, ids)  # the variant renders the same text
    np.testing.assert_array_equal((whole.weights > 0).astype(int), mask)
    if name in REWRITES:
        return
    # A template that writes every turn the same way in history: every policy trains the one conversation.
    for policy in ("split", "final"):
        (ex,) = encode_examples(rec, tok, rewritten_history=policy, template_kwargs=kw)
        np.testing.assert_array_equal(ex.weights, whole.weights)


@pytest.mark.parametrize("name", REWRITES)
def test_rewritten_history_split_trains_each_turn_as_rendered_last(bpe, name):
    """split: one example per turn the template writes differently in history, = the conversation up to that
    turn, trained on it alone as the template renders it last; final: the whole conversation, those turns
    untrained."""
    if not (GENERATION / FAMILIES[name]["file"]).exists():
        pytest.skip("no {% generation %} variant of this template")
    tok, gen = family_tok(bpe, name), family_tok(bpe, name, generation=True)
    messages = reference_messages(name, chat_cases.EN_REASONING_FIELD)
    rec = record(chat_cases.EN_REASONING_FIELD)
    examples = encode_examples(rec, tok, rewritten_history="split")
    ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(examples) == len(ends) == 2
    for ex, end in zip(examples, [ends[-1], *ends[:-1]]):  # the whole conversation first
        ids, mask = mask_of(gen, messages[:end], None, {})
        np.testing.assert_array_equal(ex.ids, ids)
        last = np.asarray(mask)
        last[: ex.prompt_len] = 0  # only the final turn of each example is trained
        np.testing.assert_array_equal((ex.weights > 0).astype(int), last)
        assert (ex.weights > 0).any()
    (final,) = encode_examples(rec, tok, rewritten_history="final")
    np.testing.assert_array_equal(final.weights, examples[0].weights)


def test_qwen3_reasoning_row_trains_its_reasoning(bpe):
    """The failure that started this: a Qwen3 reasoning conversation trained zero tokens."""
    tok = family_tok(bpe, "qwen3")
    runs = []
    for ex in encode_examples(record(chat_cases.EN_REASONING_FIELD), tok):
        runs.append(tok.decode(ex.ids[ex.weights > 0]))
    for m in chat_cases.EN_REASONING_FIELD:
        if m["role"] == "assistant":
            expected = THINK.format(r=m["reasoning_content"]) + m["content"] + "<|im_end|>"
            assert expected in runs


def test_mistral_tool_ids_are_generated_and_answered(bpe):
    tok = family_tok(bpe, "mistral_v0_3")
    messages = json.loads(json.dumps(chat_cases.EN_TOOLS))
    for m in messages:
        for call in m.get("tool_calls", []):
            del call["id"]
        m.pop("tool_call_id", None)
    (ex,) = encode_examples(record(messages, chat_cases.TOOLS), tok)
    text = tok.decode(ex.ids)
    call_id = text.split('"id": "')[1][:9]
    assert call_id.isalnum() and len(call_id) == 9
    assert f'"call_id": "{call_id}"' in text  # the tool result answers the generated id
    assert "[TOOL_CALLS]" in tok.decode(ex.ids[ex.weights > 0])


def test_sharegpt_function_call_and_observation_roles(bpe):
    """LLaMA-Factory's ShareGPT tool rows render like the OpenAI rows they stand for."""
    row = [
        {"from": "human", "value": "Weather in Paris?"},
        {
            "from": "function_call",
            "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
        },
        {"from": "observation", "value": '{"temperature": 18}'},
        {"from": "gpt", "value": "It is 18 degrees."},
    ]
    msgs = M.parse_messages(row, dict(M.SHAREGPT_TAGS), "conversations", {})
    rec = Conversation(tuple(msgs), tools=json.dumps(chat_cases.TOOLS), file="glaive.json", row=0)
    openai = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": "It is 18 degrees."},
    ]  # fmt: skip
    for name in ("qwen2_5", "llama3_1"):
        tok, kw = family_tok(bpe, name), FAMILIES[name]["render_kwargs"]
        (ex,) = encode_examples(rec, tok, template_kwargs=kw)
        ref = tok.apply_chat_template(openai, tools=chat_cases.TOOLS, tokenize=True, return_dict=True, **kw)
        np.testing.assert_array_equal(ex.ids, ref["input_ids"])
        assert "get_weather" in tok.decode(ex.ids[ex.weights > 0])


def test_template_without_tool_support_is_an_error_naming_the_row(bpe):
    with pytest.raises(DataError, match=r"chat.jsonl, row 0.*does not write this turn's tool calls"):
        encode_examples(record(chat_cases.EN_TOOLS, chat_cases.TOOLS), family_tok(bpe, "chatml"))


def write_rows(path: Path, rows) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_zero_trained_row_fails_loudly_or_is_counted(bpe, tmp_path, caplog):
    tok = family_tok(bpe, "qwen2_5")
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    silent = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "loss_weight": 0}]}  # fmt: skip
    path = write_rows(tmp_path / "rows.jsonl", [good, good, silent, good])
    with pytest.raises(DataError, match=r"rows.jsonl, row 2\b.*no token of this row is trained"):
        pipeline.iterators(path, tok, 1, "lm")
    caplog.set_level(logging.INFO, logger="jaxtune.data")
    it = pipeline.iterators(path, tok, 1, "lm", on_error="skip").train
    assert it.policy.skipped == {"nothing trained": 1}
    tokens = it.report.tokens
    per_row = len(encode_examples(record(good["messages"]), tok)[0].ids)
    assert tokens["trained (assistant)"] + tokens["not trained"] == 3 * per_row
    assert tokens["trained (assistant)"] == 3 * len(
        tok("Hello.<|im_end|>", add_special_tokens=False)["input_ids"]
    )
    assert any("tokens trained: " in r.getMessage() for r in caplog.records)


def test_template_kwargs_reach_the_template(bpe):
    """Qwen3 with enable_thinking=false: the empty think block is part of the prompt, every turn is written
    the same way in history, so the conversation is one example."""
    tok = family_tok(bpe, "qwen3")
    rec = record(chat_cases.EN_CHAT)
    (ex,) = encode_examples(rec, tok, template_kwargs={"enable_thinking": False})
    runs = tok.decode(ex.ids[ex.weights > 0])
    assert "<think>" not in runs and runs.count("<|im_end|>") == 2
    with pytest.raises(DataError, match="template_kwargs may not set tokenize"):
        encode_examples(rec, tok, template_kwargs={"tokenize": True})


@pytest.mark.parametrize("name", ["phi3", "mistral_v0_3", "qwen3"])
def test_tokenizers_without_offsets_encode_the_same(bpe, name):
    """Slow tokenizers have no offsets: the end marker is still cut at whole tokens (Phi-3's `<|end|>\\n`
    then `<|endoftext|>` vs `<|user|>` share `<|` as characters, not as tokens)."""
    from test_data_masks import NoOffsets

    tok = family_tok(bpe, name)
    slow = NoOffsets(tok)
    slow.get_chat_template = tok.get_chat_template
    for _, messages, tools in chat_cases.cases_for(FAMILIES[name]["supports"]):
        rec, kw = record(messages, tools), FAMILIES[name]["render_kwargs"]
        fast, plain = (
            encode_examples(rec, tok, template_kwargs=kw),
            encode_examples(rec, slow, template_kwargs=kw),
        )
        assert len(fast) == len(plain)
        for a, b in zip(fast, plain):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.weights, b.weights)
