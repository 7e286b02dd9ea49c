"""Every supported format and file type loads into the same normalised records."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from jaxtune import data
from jaxtune.data.records import Conversation, Message, Preference, Text

U, A = "user", "assistant"


def roles(rec) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in rec.messages]


def dump(tmp_path, name, rows) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def test_alpaca_with_system_and_history(tmp_path):
    row = {
        "instruction": "Sum",
        "input": "2 and 2",
        "output": "4",
        "system": "Be exact.",
        "history": [["hi", "hello"]],
    }
    (rec,) = data.load(dump(tmp_path, "a.json", [row]))
    assert isinstance(rec, Conversation) and rec.system == "Be exact."
    assert roles(rec) == [(U, "hi"), (A, "hello"), (U, "Sum\n2 and 2"), (A, "4")]
    assert (rec.file, rec.row) == (str(tmp_path / "a.json"), 0)


def test_sharegpt_with_system_and_tools(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ],
        "tools": "[]",
    }
    (rec,) = data.load(dump(tmp_path, "s.json", [row]))
    assert rec.system == "S" and rec.tools == "[]" and roles(rec) == [(U, "q"), (A, "a")]


def test_sharegpt_column_and_tag_remapping_via_registry(tmp_path):
    """LLaMA-Factory's `columns` and `tags`, exactly as in its dataset_info.json."""
    row = {"dialog": [{"who": "me", "text": "q"}, {"who": "ai", "text": "a"}], "sys": "S"}
    dump(tmp_path, "custom.json", [row])
    info = {
        "custom": {
            "file_name": "custom.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "sys"},
            "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "ai"},
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (rec,) = data.load("custom", dataset_dir=tmp_path)
    assert rec.system == "S" and roles(rec) == [(U, "q"), (A, "a")]
    # The same mapping given inline in a source dict.
    (rec2,) = data.load({"path": str(tmp_path / "custom.json"), **{k: info["custom"][k] for k in ("columns", "tags")},
                         "format": "sharegpt"})  # fmt: skip
    assert rec2.messages == rec.messages


def test_openai_messages_with_tool_calls(tmp_path):
    row = {
        "messages": [
            {"role": "developer", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "20C"},
            {"role": "assistant", "content": "20 degrees", "loss_weight": 0.5},
        ]
    }  # fmt: skip
    (rec,) = data.load(dump(tmp_path, "o.jsonl", [row]))
    assert rec.system == "S"
    assert [m.role for m in rec.messages] == ["user", "function_call", "observation", "assistant"]
    assert rec.messages[0].content == "weather Paris?"
    call = rec.messages[1]
    assert call.content == "" and json.loads(call.calls_json()) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert call.tool_calls[0].id is None and rec.messages[2].tool_call_id is None
    assert rec.messages[3].loss_weight == 0.5


def test_preference_variants(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ]  # fmt: skip
    recs = data.load(dump(tmp_path, "p.jsonl", rows))
    for rec in recs:
        assert isinstance(rec, Preference)
        assert rec.prompt == (Message(U, "q"),)
        assert rec.chosen == (Message(A, "good"),) and rec.rejected == (Message(A, "bad"),)
    # TRL implicit prompt: full conversations sharing their first turns.
    conv = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
    (rec,) = data.load(dump(tmp_path, "imp.jsonl", [{"chosen": conv("good"), "rejected": conv("bad")}]))
    assert rec.prompt == (Message(U, "q"),) and rec.chosen == (Message(A, "good"),)
    # ShareGPT preference: conversations + one chosen/rejected message (dpo_en_demo.json).
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}  # fmt: skip
    (rec,) = data.load(dump(tmp_path, "sg.json", [row]))
    assert rec.prompt == (Message(U, "q"),) and rec.rejected == (Message(A, "bad"),)
    # Alpaca ranking (LLaMA-Factory): chosen/rejected string columns.
    (tmp_path / "dataset_info.json").write_text(json.dumps({"r": {"file_name": "r.json", "ranking": True}}))
    dump(tmp_path, "r.json", [{"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}])
    (rec,) = data.load("r", dataset_dir=tmp_path)
    assert rec.chosen == (Message(A, "good"),)


def test_kto_unpaired(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": True,
        },
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            "label": False,
        },
    ]
    assert [r.label for r in data.load(dump(tmp_path, "k.jsonl", rows))] == [True, False]
    (rec,) = data.load(dump(tmp_path, "k2.jsonl", [{"prompt": "q", "completion": "a", "label": False}]))
    assert rec.label is False and roles(rec) == [(U, "q"), (A, "a")]


def test_text_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("doc one\ndoc two\n\n")
    assert [r.text for r in data.load(tmp_path / "lines.txt")] == ["doc one", "doc two"]
    (tmp_path / "blocks.txt").write_text("para one\nstill one\n\npara two\n")
    assert [r.text for r in data.load(tmp_path / "blocks.txt")] == ["para one\nstill one", "para two"]
    (rec,) = data.load(dump(tmp_path, "t.jsonl", [{"text": "hello", "meta": 1}]))
    assert rec == Text("hello", str(tmp_path / "t.jsonl"), 0)


def test_qa_table_csv_and_parquet(tmp_path):
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerow(["What is 2+2?", "4, of course"])
    (rec,) = data.load(path)
    assert roles(rec) == [(U, "What is 2+2?"), (A, "4, of course")]
    # Any two columns, named.
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"q": ["x", "y"], "sol": ["1", "2"]}), tmp_path / "t.parquet")
    recs = data.load(
        {"path": str(tmp_path / "t.parquet"), "format": "qa", "columns": {"prompt": "q", "response": "sol"}}
    )
    assert [roles(r) for r in recs] == [[(U, "x"), (A, "1")], [(U, "y"), (A, "2")]]


def test_directory_gzip_and_json_lines_in_dot_json(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.json").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")
    recs = data.load(d)
    assert [type(r).__name__ for r in recs] == ["Text", "Text", "Conversation"]
    assert recs[2].file.endswith("b.jsonl.gz")


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"instruction": "q", "input": "", "output": "a"}]).save_to_disk(
        tmp_path / "hf"
    )
    (rec,) = data.load(tmp_path / "hf")
    assert roles(rec) == [(U, "q"), (A, "a")]


def test_max_samples_num_samples_and_answer_column(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "solution": f"s{i}"} for i in range(10)]
    path = dump(tmp_path, "m.json", rows)
    assert len(data.load({"path": path, "max_samples": 3})) == 3
    (tmp_path / "dataset_info.json").write_text(json.dumps({"m": {"file_name": "m.json", "num_samples": 25}}))
    assert len(data.load("m", dataset_dir=tmp_path, format="qa")) == 25
    (rec,) = data.load({"path": path, "max_samples": 1, "columns": {"answer": "solution"}})
    assert rec.answer == "s0"
