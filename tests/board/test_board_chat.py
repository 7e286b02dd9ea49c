"""The board's chat backend (jaxtune/board/chat.py) against `jaxtune generate`: the same greedy text for the
same prompt, the history through the chat template, stop strings, one model at a time, one reply at a time."""

import argparse
import io
import shutil
import threading
import weakref

import jax
import pytest

from jaxtune import generate_cli
from jaxtune.board.chat import ChatModel
from jaxtune.config import GenerationConfig
from jaxtune.errors import JaxtuneError
from jaxtune.generate import generate
from jaxtune.generate_cli import GenerateError

NEW = 8
GREEDY = GenerationConfig(max_new_tokens=NEW, temperature=0.0)
PROMPT = "Reverse the word.\nabcde"


def printed(directory, prompt: str, gen: GenerationConfig, system=None) -> str:
    """What `jaxtune generate --model DIR --prompt PROMPT` prints (one prompt: the text and a newline)."""
    args = argparse.Namespace(
        prompt=[prompt], file=None, system=system, template=None, raw=False, jsonl=False, generation=gen,
        seed=0, batch_size=16,
    )  # fmt: skip
    out = io.StringIO()
    generate_cli.run_generate(args, generate_cli.load(str(directory)), out=out)
    assert out.getvalue().endswith("\n")
    return out.getvalue()[:-1]


def streamed(chat, history, message, gen=GREEDY, system=None) -> list[str]:
    texts = list(chat.reply(history, message, system, gen))
    assert texts and all(a != b for a, b in zip(texts, texts[1:]))  # at least once, only when it changed
    return texts


def test_streamed_reply_ends_as_jaxtune_generate_prints(chat_dir):
    chat = ChatModel()
    description = chat.load(str(chat_dir))
    assert description == chat.loaded
    assert description.startswith(f"{chat_dir}: llama, ") and "k params" in description
    assert description.endswith("chat template: tokenizer's own")
    texts = streamed(chat, [], PROMPT)
    expected = printed(chat_dir, PROMPT, GREEDY)
    assert len(expected) >= 4
    assert texts[-1] == expected
    assert all(expected.startswith(t) for t in texts)  # one character per token: the reply grows
    assert len(texts) > 1


def test_history_is_encoded_through_the_chat_template(chat_dir):
    chat = ChatModel()
    chat.load(str(chat_dir))
    tok = chat._current.loaded.tokenizer
    history = [("hello", "olleh"), ("Uppercase the word.\nabc", "ABC")]
    messages = [{"role": "system", "content": "Be brief."}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": "again"})
    ids = chat.prompt_ids(history, "again", "Be brief.")
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    m = chat._current.loaded
    out = generate(m.arch, m.variables, [ids], max_new_tokens=NEW, stop_ids=m.stop_ids, pad_multiple=32)[0]
    final = streamed(chat, history, "again", system="Be brief.")[-1]
    assert final == tok.decode(out, skip_special_tokens=True)
    assert final != streamed(chat, [], "again", system="Be brief.")[-1]  # the history changed the reply


def test_a_stop_string_cuts_the_reply(chat_dir):
    chat = ChatModel()
    chat.load(str(chat_dir))
    full = streamed(chat, [], PROMPT)[-1]
    stop = full[2:4]
    gen = GenerationConfig(max_new_tokens=NEW, temperature=0.0, stop=(stop,))
    texts = streamed(chat, [], PROMPT, gen)
    assert texts[-1] == full[: full.index(stop)] == printed(chat_dir, PROMPT, gen)
    assert all(stop not in t for t in texts)


def test_loading_a_second_model_unloads_the_first(chat_dir, tmp_path):
    chat = ChatModel()
    chat.load(str(chat_dir))
    first = weakref.ref(jax.tree.leaves(chat._current.loaded.variables)[0])
    other = tmp_path / "other"
    shutil.copytree(chat_dir, other)
    description = chat.load(str(other), template="chatml")
    assert chat.loaded == description and description.startswith(f"{other}: ")
    assert description.endswith("chat template: chatml")
    assert first() is None  # the first model's weights are gone
    assert streamed(chat, [], PROMPT)  # the second one replies
    chat.unload()
    assert chat.loaded is None
    with pytest.raises(GenerateError, match="no model is loaded"):
        next(chat.reply([], PROMPT, None, GREEDY))


def test_load_errors_are_one_line_jaxtune_errors(chat_dir, tmp_path):
    chat = ChatModel()
    with pytest.raises(GenerateError, match="no model is loaded"):
        next(chat.reply([], PROMPT, None, GREEDY))
    missing = tmp_path / "missing"
    with pytest.raises(GenerateError) as direct:
        generate_cli.load(str(missing))
    with pytest.raises(GenerateError) as board:
        chat.load(str(missing))
    assert str(board.value) == str(direct.value)
    assert "neither a Hugging Face model directory" in str(board.value)
    with pytest.raises(JaxtuneError, match="unknown chat template 'chatmk'"):
        chat.load(str(chat_dir), template="chatmk")
    plain = tmp_path / "plain"  # a tokenizer without a chat template: name one
    shutil.copytree(chat_dir, plain)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(GenerateError, match="no chat template of its own; choose one of .*chatml"):
        chat.load(str(plain))
    assert chat.load(str(plain), template="chatml").endswith("chat template: chatml")
    broken = tmp_path / "broken"
    shutil.copytree(chat_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(JaxtuneError, match="config.json: invalid JSON at line 1") as e:
        chat.load(str(broken))
    assert "\n" not in str(e.value)
    assert chat.loaded is None  # the model loaded before the failed load was freed


def test_an_unexpected_loader_failure_becomes_a_generate_error(chat_dir, monkeypatch):
    """Not a jaxtune error (a bug or an OS failure deep in a loader): one line naming the directory."""

    def failing(model_dir, adapter_dir=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(generate_cli, "load", failing)
    chat = ChatModel()
    with pytest.raises(GenerateError, match=f"^cannot load {chat_dir}: OSError: .*No space left on device$"):
        chat.load(str(chat_dir))
    assert chat.loaded is None


def test_one_reply_at_a_time_and_unload_ends_a_streaming_reply(chat_dir):
    chat = ChatModel()
    chat.load(str(chat_dir))
    expected = streamed(chat, [], PROMPT)
    first = chat.reply([], PROMPT, None, GREEDY)
    assert next(first) == expected[0]  # the first reply holds the model
    second: list[str] = []
    other_tab = threading.Thread(target=lambda: second.extend(chat.reply([], PROMPT, None, GREEDY)))
    other_tab.start()
    other_tab.join(0.3)
    assert other_tab.is_alive() and not second  # waits for the first reply
    assert [expected[0], *first] == expected
    other_tab.join(60)
    assert second == expected
    streaming = chat.reply([], PROMPT, None, GREEDY)
    next(streaming)
    unloading = threading.Thread(target=chat.unload)
    unloading.start()
    unloading.join(0.3)
    assert unloading.is_alive()  # waits for the reply, which ends at its next token
    assert list(streaming) == []
    unloading.join(60)
    assert not unloading.is_alive() and chat.loaded is None
