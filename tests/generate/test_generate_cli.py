"""`jaxtune generate` and `jaxtune chat` against the library: the same prompts through the chat template and
`jaxtune.generate.generate` must give the same text; chat keeps the history between turns until /reset."""

import io
import json
import shutil
import sys

import pytest

import jaxtune
from jaxtune import cli, demo
from jaxtune.data.records import Conversation, Message
from jaxtune.data.tokenize import encode_prompt
from jaxtune.generate import generate

NEW = 8


@pytest.fixture(scope="module")
def chat_dir(tiny_llama, tmp_path_factory):
    """The tiny Llama with the demo's character tokenizer and chat template saved beside it."""
    directory = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(tiny_llama[1], directory, dirs_exist_ok=True)
    demo.char_tokenizer().save_pretrained(directory)
    return directory


def reply(directory, turns: list[str]) -> str:
    """The oracle: greedy reply to alternating user / assistant turns, straight through the library."""
    model = jaxtune.load_model(directory)
    tok = model.tokenizer
    messages = tuple(Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns))
    ids = encode_prompt(Conversation(messages), tok).tolist()
    out = generate(model.arch, {"params": model.params}, [ids], max_new_tokens=NEW, stop_ids=[tok.eos_token_id],
                   pad_multiple=32)[0]  # fmt: skip
    return tok.decode(out, skip_special_tokens=True)


def greedy(chat_dir) -> list[str]:
    """`jaxtune generate` with greedy decoding of NEW tokens and --jsonl output."""
    return ["generate", "--model", str(chat_dir), "--temperature", "0", "--max-new-tokens", str(NEW), "--jsonl"]


def test_generate_prints_the_library_completions(chat_dir, capsys):
    prompts = ["Reverse the word.\nabcde", "Uppercase the word.\nhgf"]
    args = greedy(chat_dir)
    assert cli.main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [reply(chat_dir, [p]) for p in prompts]
    assert [r["completion"] for r in rows] == expected
    assert [r["prompt"] for r in rows] == prompts
    # a stop string cuts the text before it
    stop = expected[0][2:4]
    assert cli.main(args + ["--prompt", prompts[0], "--stop", stop]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == expected[0][: expected[0].index(stop)]


def test_generate_reads_a_dataset_file(chat_dir, tmp_path, capsys):
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"instruction": "Reverse the word.", "input": "abc", "output": "cba"}]))
    assert cli.main(["generate", "--model", str(chat_dir), "--temperature", "0", "--max-new-tokens", str(NEW),
                     "--file", str(data), "--jsonl"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)
    assert row["answer"] == "cba"  # the dataset's answer is kept, not sent to the model
    assert row["completion"] == reply(chat_dir, [row["prompt"]])


def test_generate_reads_back_its_own_jsonl_output(chat_dir, tmp_path, capsys):
    """`--jsonl` rows ({"prompt", "completion"[, "answer"]}) are prompts for `--file`: the same greedy
    completions come back, and a row's answer is kept."""
    base = greedy(chat_dir)
    dataset = tmp_path / "prompts.json"
    dataset.write_text(json.dumps([{"instruction": "Reverse the word.", "input": "abc", "output": "cba"}]))
    assert cli.main([*base, "--prompt", "Uppercase the word.\nhgf", "--file", str(dataset)]) == 0
    first = capsys.readouterr().out
    rows = [json.loads(line) for line in first.splitlines()]
    assert [sorted(r) for r in rows] == [["completion", "prompt"], ["answer", "completion", "prompt"]]
    written = tmp_path / "out.jsonl"
    written.write_text(first)
    assert cli.main([*base, "--file", str(written)]) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in rows]
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]
    assert again[1]["answer"] == "cba"
    only_prompts = tmp_path / "prompts.jsonl"
    only_prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    assert cli.main([*base, "--file", str(only_prompts)]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert plain == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def test_a_file_of_no_prompts_names_the_accepted_shapes(chat_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_text": "q"}) + "\n")
    assert cli.main(["generate", "--model", str(chat_dir), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"jaxtune: error: --file {bad}, row 0: cannot tell the data format")
        and err.count("\n") == 1
    )
    assert "'prompt'" in err and "--prompt TEXT" in err
    assert "name the format" not in err and "map the columns" not in err  # options generate does not have


def test_chat_with_piped_stdin_keeps_history_until_reset(chat_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/reset\nagain\n"))  # not a terminal: no "> "
    assert (
        cli.main(["chat", "--model", str(chat_dir), "--temperature", "0", "--max-new-tokens", str(NEW)]) == 0
    )
    first = reply(chat_dir, ["hello"])
    second = reply(chat_dir, ["hello", first, "again"])
    fresh = reply(chat_dir, ["again"])
    assert second != fresh  # the history changes the answer, so the check below sees it kept
    assert capsys.readouterr().out == f"{first}\n{second}\n{fresh}\n"


def test_bad_model_dir_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxtune: error: --model {tmp_path}: neither a Hugging Face model directory")
