"""Bad input is reported with file, row and field; `on_error="skip"` drops, counts and logs it."""

from __future__ import annotations

import json
import logging

import pytest

from jaxtune import data
from jaxtune.data.errors import DataError

ALPACA = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_truncated_json_array(tmp_path):
    text = json.dumps(ALPACA, indent=1)
    path = write(tmp_path, "cut.json", text[: text.index('"a2"') + 2])  # cut inside row 2
    with pytest.raises(DataError) as e:
        data.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, row 2 (line ") and "malformed JSON" in msg and "truncated" in msg
    assert e.value.row == 2 and e.value.file == path


def test_malformed_jsonl_line(tmp_path):
    lines = [json.dumps(r) for r in ALPACA]
    lines[1] = lines[1][:-5]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines))
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1 \(line 2\): malformed JSON line"):
        data.load(path)


def test_missing_output(tmp_path):
    rows = [dict(r) for r in ALPACA]
    del rows[3]["output"]
    path = write(tmp_path, "alpaca.json", json.dumps(rows))
    with pytest.raises(DataError) as e:
        data.load(path)
    assert str(e.value).startswith(f"{path}, row 3 (line ")
    assert "field 'output': required column is missing" in str(e.value)
    assert (e.value.row, e.value.field) == (3, "output")


def test_wrong_type(tmp_path):
    rows = [dict(r) for r in ALPACA]
    rows[1]["output"] = ["not", "a", "string"]
    path = write(tmp_path, "alpaca.json", json.dumps(rows))
    with pytest.raises(DataError, match=r"row 1 \(line \d+\), field 'output': expected a string, got list"):
        data.load(path)


def test_unknown_role(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    path = write(tmp_path, "chat.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        data.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, row 0 (line 1), field 'conversations[1].from': unknown role 'bot'")
    assert "human" in msg and "gpt" in msg  # the roles it expected


def test_empty_conversation(tmp_path):
    path = write(tmp_path, "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
                 + json.dumps({"messages": []}) + "\n")  # fmt: skip
    with pytest.raises(
        DataError, match=r"chat\.jsonl, row 1 \(line 2\), field 'messages': empty conversation"
    ):
        data.load(path)


def test_non_utf8_bytes_name_the_field(tmp_path):
    good = json.dumps({"instruction": "q", "input": "", "output": "a"}).encode()
    bad = b'{"instruction": "caf\xe9", "input": "", "output": "a"}'
    path = write(tmp_path, "latin1.jsonl", good + b"\n" + bad + b"\n")
    with pytest.raises(DataError) as e:
        data.load(path)
    assert str(e.value).startswith(f"{path}, row 1 (line 2), field 'instruction': text is not valid UTF-8")
    # Also inside a JSON array, down to the nested message field.
    arr = b'[{"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "\xff\xfe"}]}]'
    path = write(tmp_path, "arr.json", arr)
    with pytest.raises(
        DataError, match=r"row 0 \(line 1\), field 'conversations\[1\]\.value': text is not valid UTF-8"
    ):
        data.load(path)


def test_wrong_label_type(tmp_path):
    row = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "label": "maybe",
    }
    path = write(tmp_path, "kto.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"field 'label': KTO label must be a boolean, got 'maybe'"):
        data.load(path)


def test_skip_counts_and_logs(tmp_path, caplog):
    lines = [json.dumps(r) for r in ALPACA]
    lines[0] = "{not json"
    lines[2] = json.dumps({"instruction": "q", "input": ""})  # no output
    path = write(tmp_path, "mixed.jsonl", "\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        policy = data.errors.ErrorPolicy("skip")
        records = data.load(path, policy=policy)
    assert [r.row for r in records] == [1, 3]
    assert policy.skipped == {"malformed JSON": 1, "missing field": 1}
    assert "row 0 (line 1): malformed JSON line" in caplog.text
    assert "row 2 (line 3), field 'output'" in caplog.text
    assert "skipped 2 records" not in caplog.text  # a caller's policy: the caller logs the summary, once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        assert len(data.load(path, on_error="skip")) == 2
    assert caplog.text.count("skipped 2 records: 1 x malformed JSON, 1 x missing field") == 1


def test_skips_over_several_sources_are_summed_up_once(tmp_path, caplog):
    from jaxtune.data import pipeline
    from jaxtune.demo import char_tokenizer

    lines = [json.dumps(r) for r in ALPACA]
    paths = [write(tmp_path, f"{k}.jsonl", "\n".join(["{not json", *lines])) for k in "ab"]
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        pipeline.iterators(paths, char_tokenizer(), 2, "lm", on_error="skip", cache=False)
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert summaries == ["skipped 2 records: 2 x malformed JSON"]


def test_unknown_format_names_the_columns(tmp_path):
    path = write(tmp_path, "odd.jsonl", json.dumps({"foo": 1, "bar": 2}) + "\n")
    with pytest.raises(
        DataError,
        match=r"odd\.jsonl, row 0 \(line 1\): cannot tell the data format from the columns \['bar', 'foo'\]",
    ):
        data.load(path)
    with pytest.raises(ValueError, match="did you mean 'sharegpt'"):
        data.load(path, format="sharegtp")


def test_registry_errors(tmp_path):
    info = {"hub_only": {"hf_hub_url": "org/data"}, "typo": {"file_name": "x.json", "colums": {}}}
    write(tmp_path, "dataset_info.json", json.dumps(info))
    with pytest.raises(
        DataError, match=r"field 'hub_only': dataset 'hub_only' is only on a hub \(org/data\)"
    ):
        data.load("hub_only", dataset_dir=tmp_path)
    with pytest.raises(DataError, match=r"field 'typo.colums': unknown key; did you mean 'columns'"):
        data.load("typo", dataset_dir=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        data.load(str(tmp_path / "absent.json"))
    # neither a file nor a registry name: both places looked at are named, with the closest name
    with pytest.raises(DataError, match=r"not a file .*absent_name\), and not a dataset named in .*dataset_info.json"):
        data.load("absent_name", dataset_dir=tmp_path)
    with pytest.raises(DataError, match="not a dataset named in .*; did you mean 'hub_only'"):
        data.load("hub_onyl", dataset_dir=tmp_path)
    with pytest.raises(DataError, match=r"data.dataset_dir has no dataset_info.json to look it up in"):
        data.load("dpo_en_demo", dataset_dir=tmp_path / "no_such_dir")


def test_no_response_to_train_on(chatml_tok):
    rec = data.Conversation((data.Message("user", "q"),), file="f.json", row=7)
    with pytest.raises(DataError, match=r"f\.json, row 7, field 'messages': no assistant turn to train on"):
        data.encode(rec, chatml_tok)


def test_a_missing_path_is_one_error_before_the_cache_reads_it(tmp_path):
    """With the tokenised cache on (the default), the fingerprint used to open the file first: a traceback.
    Now the source is checked where it is resolved; a glob-looking path says globs are not expanded."""
    from jaxtune.data import pipeline
    from jaxtune.demo import char_tokenizer

    for given, says in [(str(tmp_path / "nothere.json"), r"nothere\.json: no such file or directory$"),
                        (str(tmp_path / "part_*.json"), r"part_\*\.json: no such file or directory; a path is not "
                                                        r"expanded as a glob: give the directory")]:  # fmt: skip
        with pytest.raises(DataError, match=says):
            pipeline.iterators([given], char_tokenizer(), 2, "lm", cache=True, cache_dir=str(tmp_path / "cache"))


def test_multimodal_columns_are_refused_not_dropped(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
             "images": ["cat.png"]}]  # fmt: skip
    path = write(tmp_path, "mm.json", json.dumps(rows))
    with pytest.raises(DataError, match=r"mm\.json.*maps the images column\(s\) \('images'\): jaxtune trains text-only"):
        data.load({"path": path, "format": "sharegpt", "columns": {"messages": "messages", "images": "images"}})
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mm": {"file_name": "mm.json", "formatting": "sharegpt",
                                                                   "columns": {"messages": "messages", "images": "images"}}}))  # fmt: skip
    with pytest.raises(DataError, match=r"dataset_info\.json.*dataset 'mm' maps the images column"):
        data.load("mm", dataset_dir=tmp_path)
    assert len(data.load({"path": path, "format": "sharegpt", "columns": {"messages": "messages"}})) == 1


def test_a_config_source_can_say_ranking(tmp_path):
    """`ranking: true` in a data.train mapping: a ShareGPT preference file named with format sharegpt reads as
    chosen/rejected pairs (as LLaMA-Factory's dataset_info.json `ranking` does)."""
    from jaxtune.config import load_config
    from jaxtune.data.records import Preference

    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}  # fmt: skip
    path = write(tmp_path, "sg.json", json.dumps([row]))
    cfg = load_config({"data": {"train": [{"path": path, "format": "sharegpt", "ranking": True}]}})
    (rec,) = data.load(cfg.data.train[0])
    assert isinstance(rec, Preference) and rec.chosen[0].content == "good" and rec.rejected[0].content == "bad"
    (tmp_path / "dataset_info.json").write_text(json.dumps({"sg": {"file_name": "sg.json", "formatting": "sharegpt"}}))
    cfg = load_config({"data": {"dataset_dir": str(tmp_path), "train": [{"name": "sg", "ranking": True}]}})
    (rec,) = data.load(cfg.data.train[0], dataset_dir=str(tmp_path))
    assert isinstance(rec, Preference)
