"""A corpus of malformed data files, built in tmp: each is named in one error that locates it (file, row or
line, field), or, where the input is unambiguous but not strict, read with a warning naming file and line.
`jaxtune data inspect` prints such an error as one `jaxtune: error:` line; `on_error: skip` counts skips by
reason.
"""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from jaxtune import cli, data
from jaxtune.data.errors import DataError, ErrorPolicy
from jaxtune.data.pipeline import iterators
from jaxtune.errors import RunError

ROW = {"instruction": "q", "input": "", "output": "a"}


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def error(path, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        data.load(path, **kw)
    return e.value


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def chat(*turns, key="conversations", **extra) -> dict:
    """A ShareGPT row from (from, value) pairs."""
    return {key: [{"from": f, "value": v} for f, v in turns], **extra}


def msgs(*turns, **extra) -> dict:
    return {"messages": [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns], **extra}


# ---- 1. files with nothing to read --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("a.json", "", "the file is empty"),
        ("a.json", " \n\t\n", "the file holds only whitespace"),
        ("a.jsonl", "", "the file is empty"),
        ("a.jsonl", "\n  \n", "the file holds only whitespace"),
        ("a.csv", "", "the file is empty"),
        ("a.tsv", "\n", "the file holds only whitespace"),
        ("a.txt", "  \n\n", "the file holds only whitespace"),
        ("a.json", "[ ]", "the file holds an empty JSON list"),
        ("a.json", "{}\n", "the file holds an empty JSON object"),
        ("a.csv", "instruction,input,output\n", "the file holds only a header row (instruction, input, output)"),
        ("a.jsonl.gz", gzip.compress(b""), "the file is empty"),
    ],
)
def test_empty_file_is_named(tmp_path, name, content, says):
    path = write(tmp_path, name, content)
    assert str(error(path)) == f"{path}: {says}: no rows to read"


def test_empty_parquet_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert str(error(path)) == f"{path}: the file holds no rows (a Parquet table of 0 rows): no rows to read"


def test_directory_with_empty_files(tmp_path, caplog):
    write(tmp_path / "d", "a.jsonl", jsonl(ROW, ROW))
    empty = write(tmp_path / "d", "b.json", "")
    e = error(str(tmp_path / "d"))
    assert str(e).startswith(f"{empty}: the file is empty") and "data.on_error: skip" in str(e)
    policy = ErrorPolicy("skip")
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        assert len(data.load(str(tmp_path / "d"), policy=policy)) == 2
    assert policy.skipped == {"empty file": 1} and f"{empty}: the file is empty" in caplog.text
    write(tmp_path / "e", "a.csv", "")
    write(tmp_path / "e", "b.txt", "\n")
    e = error(str(tmp_path / "e"), on_error="skip")
    assert str(e) == f"{tmp_path / 'e'}: the directory holds no rows: all its 2 data files are empty (a.csv, b.txt)"


def test_no_complete_batch_names_the_files_and_their_counts(tmp_path):
    from jaxtune import demo

    a = write(tmp_path, "a.jsonl", jsonl(ROW, ROW, {**ROW, "output": " "}))
    b = write(tmp_path, "b.json", json.dumps([ROW]))
    train, _ = iterators([a, b], demo.char_tokenizer(), 8, "lm", cutoff_len=64)
    with pytest.raises(RunError) as e:
        next(train)
    msg = str(e.value)
    assert "an epoch has 3 examples, fewer than the batch size 8" in msg
    assert f"{a}: 3 records read, 2 kept -> 2 examples; {b}: 1 records read, 1 kept -> 1 examples" in msg
    assert "(dropped: 1 x empty)" in msg


# ---- 2. CSV quotes ------------------------------------------------------------------------------------------

HEAD = "instruction,input,output\n"


@pytest.mark.parametrize(
    "body, line, field, says",
    [
        # last column, no later quote: the rows after it became one answer
        ('q0,,a0\nq1,,"a1\nq2,,a2\nq3,,a3\n', 3, "output", "runs to the end of the file"),
        # middle column: was misreported as a null field lines later
        ('q0,,a0\n"q1,,a1\nq2,,a2\n', 3, "instruction", "runs to the end of the file"),
        # closed by the quote that opens a later field: 5 rows read as 3
        ('q0,,a0\nq1,,"a1\nq2,,a2\nq3,,"a3"\nq4,,a4\n', 3, "output", "followed by more text"),
        # closed by a stray quote: the lines inside read as records
        ('q0,,a0\nq1,"x\nq2,,a2\nq3,,a3"\nq4,,a4\n', 3, "input", "each of which reads as a record of 3 cells"),
    ],
)
def test_unclosed_csv_quote_is_located_where_it_opens(tmp_path, body, line, field, says):
    path = write(tmp_path, "a.csv", HEAD + body)
    e = error(path)
    assert str(e).startswith(f"{path}, row 1 (line {line}), field '{field}': unclosed quote")
    assert says in str(e) and (e.row, e.line, e.field, e.reason) == (1, line, field, "unclosed quote")
    # with on_error: skip, the rows before it load and the rest is one counted skip
    policy = ErrorPolicy("skip")
    assert [r.messages[-1].content for r in data.load(path, policy=policy)] == ["a0"]
    assert policy.skipped == {"unclosed quote": 1}


def test_tsv_unclosed_quote_and_closed_multiline_fields(tmp_path, caplog):
    path = write(tmp_path, "a.tsv", 'instruction\tinput\toutput\nq0\t\t"a0\nq1\t\ta1\n')
    assert str(error(path)).startswith(f"{path}, row 0 (line 2), field 'output': unclosed quote")
    text = HEAD + 'q0,,"line one, with a comma\n  def f(a, b):\n""quoted"""\nq1,,a1\n"q,2",,"x\ny"\n'
    path = write(tmp_path, "ok.csv", text)
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        records = data.load(path)
    assert [r.messages[-1].content for r in records] == [
        'line one, with a comma\n  def f(a, b):\n"quoted"', "a1", "x\ny"
    ]
    assert [r.row for r in records] == [0, 1, 2] and not caplog.text
    # a row's line is where it starts, also after a multi-line record
    path = write(tmp_path, "short.csv", HEAD + 'q0,,"a\nb"\nq1,a1\n')
    assert str(error(path)).startswith(f"{path}, row 1 (line 4), field 'output': fewer cells than header columns")


@pytest.mark.parametrize(
    "text, says",
    [
        ("instruction;input;output\nq;;a\n", "the header has one column ('instruction;input;output'); is the file "
         "delimited by ';'?"),
        ("instruction,output,output\nq,a,b\n", "the header names column 'output' twice"),
        ("instruction,,output\nq,,a\n", "header column 2 has no name"),
    ],
)  # fmt: skip
def test_csv_header_problems(tmp_path, text, says):
    path = write(tmp_path, "h.csv", text)
    assert str(error(path)) == f"{path}, line 1, field 'header': {says}"


# ---- 3. lenient and strict JSON -----------------------------------------------------------------------------


def test_trailing_comma_and_nan_are_read_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, "a.json", "[\n" + json.dumps(ROW) + ",\n" + json.dumps(ROW) + ",\n]\n")
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        assert len(data.load(path)) == 2
    assert f"{path}, line 3: trailing comma before the closing ']'" in caplog.text
    caplog.clear()
    rows = [{**ROW, "score": "NaN"}, {**ROW, "score": "Infinity"}]
    path = write(tmp_path, "b.jsonl", jsonl(ROW, *rows).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity"))
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        assert len(data.load(path)) == 3
    assert f"{path}, line 2: non-standard JSON constant NaN" in caplog.text
    assert caplog.text.count("non-standard JSON constant") == 1  # once per file


@pytest.mark.parametrize(
    "name, text, starts, says",
    [
        ("c.json", '[\n  // rows\n  {"instruction": "q"}\n]', "row 0 (line 2)", "at line 2 column 3; comments are not JSON"),
        ("s.json", "[{'instruction': 'q'}]", "row 0 (line 1)", "JSON strings and keys need double quotes"),
        ("t.json", '[{"instruction": "q", "output": "a",}]', "row 0 (line 1)", "a trailing comma is not JSON"),
        ("t.jsonl", '{"instruction": "q", "output": "a",}\n', "row 0 (line 1)", "a trailing comma is not JSON"),
        ("x.json", json.dumps([ROW]) + "\n" + json.dumps([ROW]), "line 2", "more text after the list's closing ']'"),
        ("o.json", '{"instruction": "q",\n "output": "a"\n "input": ""}', "row 0 (line 1)",
         "Expecting ',' delimiter at line 3 column 2"),
        ("k.json", "[" + json.dumps(ROW) + " " + json.dumps(ROW) + "]", "row 1 (line 1)",
         "expected ',' or ']' after the record, found '{'"),
    ],
)  # fmt: skip
def test_strict_json_errors_name_file_line_and_column(tmp_path, name, text, starts, says):
    path = write(tmp_path, name, text)
    e = error(path)
    assert str(e).startswith(f"{path}, {starts}: malformed JSON") and says in str(e), str(e)
    assert "truncated" not in str(e)


def test_registry_problems(tmp_path):
    write(tmp_path, "dataset_info.json", "")
    with pytest.raises(DataError, match=r"dataset_info\.json: the registry file is empty"):
        data.load("x", dataset_dir=tmp_path)
    write(tmp_path, "dataset_info.json", '{"x": {"file_name": "x.json",}}')
    with pytest.raises(DataError, match=r"dataset_info\.json, line 1: .*column 30; a trailing comma is not JSON"):
        data.load("x", dataset_dir=tmp_path)
    write(tmp_path, "dataset_info.json", json.dumps({"x": {"file_name": "x.json", "columns": "messages"}}))
    with pytest.raises(DataError, match=r"field 'x\.columns': must be an object, got str 'messages'"):
        data.load("x", dataset_dir=tmp_path)
    write(tmp_path, "x.json", "[]")
    write(tmp_path, "dataset_info.json", json.dumps({"x": {"file_name": "x.json", "ranking": "yes"}}))
    with pytest.raises(DataError, match=r"field 'x\.ranking': must be bool"):
        data.load("x", dataset_dir=tmp_path)
    write(tmp_path, "dataset_info.json", json.dumps({"x": {"file_name": "x.json"}}))
    with pytest.raises(DataError, match=r"x\.json: the file holds an empty JSON list"):
        data.load("x", dataset_dir=tmp_path)


# ---- 4. conversation structure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, field, reason",
    [
        (chat(("gpt", "hi"), ("human", "q"), ("gpt", "a")), "conversations[0].from", "starts with an assistant turn"),
        (chat(("system", "s"), ("gpt", "hi")), "conversations[1].from", "starts with an assistant turn"),
        (chat(("human", "q"), ("gpt", "a"), ("human", "q"), ("human", "q2"), ("gpt", "a")), "conversations[3].from",
         "two user turns in a row"),
        (chat(("human", "q"), ("gpt", "a"), ("gpt", "b")), "conversations[2].from", "two assistant turns in a row"),
        (chat(("human", "q"), ("observation", "{}"), ("gpt", "a")), "conversations[1].from",
         "tool result without a tool call"),
        (chat(("human", "q"), ("function_call", '{"name": "f", "arguments": {}}'), ("observation", "1"),
              ("human", "q"), ("gpt", "a")), "conversations[3].from", "user turn after a tool result"),
        (msgs(("user", "q"), ("tool", "{}"), ("assistant", "a")), "messages[1].role",
         "tool result without a tool call"),
        (msgs(("user", "q"), {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
              ("tool", "1"), ("tool", "2"), ("assistant", "a")), "messages[3].role",
         "more tool results than tool calls"),
    ],
)  # fmt: skip
def test_turn_order_is_validated(tmp_path, row, field, reason):
    good = chat(("human", "q"), ("gpt", "a")) if "conversations" in row else msgs(("user", "q"), ("assistant", "a"))
    path = write(tmp_path, "c.jsonl", jsonl(good, row))
    e = error(path)
    assert str(e).startswith(f"{path}, row 1 (line 2), field '{field}': ") and "alternate" in str(e)
    assert (e.row, e.field, e.reason) == (1, field, reason)
    policy = ErrorPolicy("skip")
    assert [r.row for r in data.load(path, policy=policy)] == [0]
    assert policy.skipped == {reason: 1}


def test_valid_tool_conversations_load(tmp_path):
    call = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}
    openai = [
        msgs(("system", "s"), ("user", "q"), {"role": "assistant", "content": "", "tool_calls": [call, call]},
             ("tool", "1"), ("tool", "2"), ("assistant", "a")),
        msgs(("user", "q")),  # a PPO/GRPO prompt
    ]  # fmt: skip
    sharegpt = chat(("human", "q"), ("function_call", '[{"name": "f", "arguments": {}}, {"name": "g"}]'),
                    ("observation", "1"), ("observation", "2"), ("gpt", "a"), ("human", "q2"), ("gpt", "b"))  # fmt: skip
    assert [len(r.messages) for r in data.load(write(tmp_path, "t.jsonl", jsonl(*openai)))] == [5, 1]
    assert [len(r.messages) for r in data.load(write(tmp_path, "s.jsonl", jsonl(sharegpt)))] == [7]


def test_sft_needs_the_assistant_last_but_prompts_do_not(tmp_path):
    from jaxtune import demo

    path = write(tmp_path, "c.jsonl", jsonl(msgs(("user", "q"), ("assistant", "a"), ("user", "more?"))))
    tok = demo.char_tokenizer()
    with pytest.raises(DataError) as e:
        iterators([path], tok, 1, "lm", cutoff_len=64)
    assert str(e.value).startswith(f"{path}, row 0, field 'messages': the conversation ends with a user turn")
    assert e.value.reason == "ends without an assistant turn"
    train, _ = iterators([path], tok, 1, "prompt", cutoff_len=64)
    assert next(train).prompts.input_ids.shape[0] == 1


# ---- 5. preference and KTO rows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"prompt": "p", "chosen": "same", "rejected": " same "}, "chosen", "chosen and rejected identical"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty completion"),
        ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "empty completion"),
        ({"instruction": "p", "chosen": "x", "rejected": "x"}, "chosen", "chosen and rejected identical"),
        (chat(("human", "q"), chosen={"from": "gpt", "value": "x"}, rejected={"from": "gpt", "value": "x"}),
         "chosen", "chosen and rejected identical"),
        (chat(("human", "q"), chosen={"from": "human", "value": "x"}, rejected={"from": "gpt", "value": "y"}),
         "chosen[0].from", "two user turns in a row"),
        ({"prompt": "p", "completion": "", "label": True}, "completion", "empty completion"),
        (msgs(("user", "q"), ("assistant", " "), label=False), "messages", "empty completion"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "wrong type"),
        ({"prompt": "p", "completion": "c", "label": 2}, "label", "wrong type"),
    ],
)  # fmt: skip
def test_preference_and_kto_rows(tmp_path, row, field, reason):
    good = {k: ("c" if k == "chosen" else "r" if k == "rejected" else v) for k, v in row.items()}
    if "label" in row:
        good = {"prompt": "p", "completion": "c", "label": True} if "prompt" in row else msgs(
            ("user", "q"), ("assistant", "a"), label=True)  # fmt: skip
    elif "conversations" in row:
        good = chat(("human", "q"), chosen={"from": "gpt", "value": "c"}, rejected={"from": "gpt", "value": "r"})
    path = write(tmp_path, "p.jsonl", jsonl(good, row))
    e = error(path)
    assert str(e).startswith(f"{path}, row 1 (line 2), field '{field}': ") and (e.field, e.reason) == (field, reason)
    policy = ErrorPolicy("skip")
    assert [r.row for r in data.load(path, policy=policy)] == [0] and policy.skipped == {reason: 1}


# ---- 6. the CLI: one `jaxtune: error:` line, no traceback ---------------------------------------------------


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("e.json", "", "e.json: the file is empty"),
        ("q.csv", HEAD + 'q0,,a0\nq1,,"a1\nq2,,a2\n', "q.csv, row 1 (line 3), field 'output': unclosed quote"),
        ("g.jsonl", jsonl(chat(("gpt", "a"), ("human", "q"))), "field 'conversations[0].from': the conversation starts"),
        ("p.jsonl", jsonl({"prompt": "p", "chosen": "x", "rejected": "x"}), "chosen and rejected are identical"),
    ],
)  # fmt: skip
def test_data_inspect_prints_one_error_line(tmp_path, capsys, name, content, says):
    path = write(tmp_path, name, content)
    config = write(tmp_path, "run.yaml", f"stage: sft\nmodel: {{tokenizer: 'builtin:chars'}}\ndata: {{train: ['{path}']}}\n")
    assert cli.main(["data", "inspect", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err and str(tmp_path) in err


def test_data_inspect_with_skip_counts_reasons(tmp_path, capsys):
    rows = [chat(("human", "q"), ("gpt", "a")), chat(("gpt", "a")), chat(("human", "q"), ("human", "q"), ("gpt", "a")),
            chat(("human", "q2"), ("gpt", "a2"))]  # fmt: skip
    path = write(tmp_path, "c.jsonl", jsonl(*rows))
    config = write(tmp_path, "run.yaml", f"stage: sft\nmodel: {{tokenizer: 'builtin:chars'}}\n"
                   f"data: {{train: ['{path}'], on_error: skip}}\n")  # fmt: skip
    assert cli.main(["data", "inspect", config]) == 0
    out = capsys.readouterr().out
    assert "skipped as bad input (starts with an assistant turn): 1" in out
    assert "skipped as bad input (two user turns in a row): 1" in out and "records loaded: 2, kept: 2" in out
