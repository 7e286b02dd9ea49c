"""Fixtures for the data tests: tiny BPE tokenizers with real-style Jinja chat templates, and the demo data.

The tokenizer is trained in well under a second with `tokenizers` (byte-level BPE, 2,000 tokens) on the
Alpaca demo text when `../shared/data` is present, else on a built-in paragraph, and wrapped as a
`transformers` fast tokenizer. Two chat templates cover the two big families of syntax: ChatML/Qwen2.5
(with tools and `<tool_call>` blocks) and Llama 3 (BOS, header ids, `| trim`, `ipython` tool results).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data" / "llamafactory"
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Describe a process of making crepes. "
    "Write a poem about the sea. What is the capital of France? Paris is the capital of France. "
    "get_weather returns the weather for a city, in degrees celsius. The answer is 42."
)

CHATML = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tc in message.tool_calls %}
{{- '\\n<tool_call>\\n{"name": "' + tc.function.name + '", "arguments": ' + (tc.function.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA3 = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = '' %}{%- endif %}
{%- if system_message or tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message }}
{%- if tools %}{{- '\\n\\nTools:' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{%- endif %}
{{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- set fn = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + fn.name + '", "parameters": ' + (fn.arguments | tojson) + '}<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + (message.content | trim) + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""


def corpus() -> list[str]:
    path = SHARED / "alpaca_en_demo.json"
    if not path.exists():
        return [_FALLBACK_TEXT] * 20
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [r[k] for r in rows for k in ("instruction", "input", "output") if r[k]]


def train_tokenizer(texts, vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="session")
def bpe():
    return train_tokenizer(corpus())


def wrap(bpe, template: str | None, **special):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def make_tok(bpe):
    """Wrap the trained BPE with any chat template and special tokens."""
    return lambda template, **special: wrap(bpe, template, **special)


@pytest.fixture(scope="session")
def chatml_tok(bpe):
    return wrap(bpe, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def llama3_tok(bpe):
    return wrap(bpe, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def base_tok(bpe):
    """A base-model tokenizer: no chat_template, so named templates apply."""
    return wrap(
        bpe, None, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(params=["chatml", "llama3"])
def chat_tok(request, chatml_tok, llama3_tok):
    return {"chatml": chatml_tok, "llama3": llama3_tok}[request.param]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "dataset_info.json").exists():
        pytest.skip("../shared/data/llamafactory is not present")
    return SHARED.resolve()
