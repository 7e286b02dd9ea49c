"""The tokenised-dataset cache (jaxtune/data/cache.py): a second run maps instead of tokenising, and yields
byte-identical batches.

Oracle: the un-cached in-memory pipeline (`cache=False`, one process), the same code path the cache build runs
chunk by chunk. Each test gets its own cache directory (`cache_dir=tmp_path`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest

from jaxtune import cli
from jaxtune.config import ConfigError, DataConfig, load_config
from jaxtune.data import cache, items, pipeline, workers
from jaxtune.data.errors import DataError
from jaxtune.data.fingerprint import cache_key
from jaxtune.data.loading import resolve
from jaxtune.data.tokenize import Example
from jaxtune.errors import RunError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache-data")
    rows = [{"instruction": f"Question {i}? " + "why " * (i % 7), "input": "", "output": f"Answer {i}. " * (1 + i % 5)}
            for i in range(40)]  # fmt: skip
    (d / "alpaca.json").write_text(json.dumps(rows))
    kto = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} " * (i + 1)}],
            "label": i % 3 == 0} for i in range(12)]  # fmt: skip
    (d / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    pref = [
        {"prompt": f"q{i}", "chosen": f"good {i} " * (i % 4 + 1), "rejected": f"bad {i}"} for i in range(12)
    ]
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    (d / "docs.txt").write_text("\n".join(f"document {i} " * (3 * i + 1) for i in range(12)))
    # 70 conversations (two worker chunks of 64 records), every tenth one with no assistant turn: a DataError
    # ("no response") at encoding, in a worker
    chat = [{"messages": [{"role": "user", "content": f"hello {i}"}]
             + ([] if i % 10 == 3 else [{"role": "assistant", "content": f"reply {i} " * (i % 6 + 1)}])}
            for i in range(70)]  # fmt: skip
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return d


CASES = {  # name: (kind, file, fields)
    "lm": ("lm", "alpaca.json", dict(val_size=0.2)),
    "lm_packed": ("lm", "alpaca.json", dict(packing=True, cutoff_len=96)),
    "text": ("text", "docs.txt", dict(packing=True, cutoff_len=32)),
    "pair": ("pair", "pref.jsonl", dict(cutoff_len=24)),
    "kto": ("kto", "kto.jsonl", dict(cutoff_len=16)),
    "prompt": ("prompt", "alpaca.json", dict()),
}


def flat(batch) -> list:
    """Every array of a (nested) batch as (dtype, shape, bytes), and its other values, in field order."""
    out = []
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if dataclasses.is_dataclass(v):
            out += flat(v)
        elif isinstance(v, np.ndarray):
            out.append((v.dtype.str, v.shape, v.tobytes()))
        else:
            out.append(v)
    return out


def batches(it, n: int = 12) -> list:
    return [flat(b) for _, b in zip(range(n), it)]


def build(files, case: str, tok, **kw):
    kind, name, fields = CASES[case]
    return pipeline.iterators(str(files / name), tok, 3, kind, seed=5, **{**fields, **kw})


def no_tokenising(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(items.Encoder, "_items", boom)
    monkeypatch.setattr(workers, "encode_chunk", boom)
    monkeypatch.setattr(pipeline, "_memory_plan", boom)  # not even loaded


@pytest.mark.parametrize("case", list(CASES))
def test_second_run_maps_and_yields_identical_batches(files, chatml_tok, tmp_path, monkeypatch, case):
    ref_train, ref_eval = build(files, case, chatml_tok, cache=False)
    assert ref_train.cache is None and not list(tmp_path.iterdir())
    first, _ = build(files, case, chatml_tok, cache_dir=str(tmp_path))
    assert first.cache is not None and not first.cache.hit
    no_tokenising(monkeypatch)
    train, ev = build(files, case, chatml_tok, cache_dir=str(tmp_path))
    assert train.cache.hit and train.cache.dir == first.cache.dir
    ref_items = [it for ds in ref_train.order.datasets for it in ds]
    got_items = [it for ds in train.order.datasets for it in ds]
    assert len(got_items) == len(ref_items) > 0
    for a, b in zip(ref_items, got_items):  # the items themselves: values, dtypes, prompt_len, labels
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            if isinstance(x, Example):
                assert (x.ids.dtype, x.weights.dtype, x.prompt_len) == (
                    y.ids.dtype,
                    y.weights.dtype,
                    y.prompt_len,
                )
                assert x.ids.tobytes() == y.ids.tobytes() and x.weights.tobytes() == y.weights.tobytes()
                assert type(y.prompt_len) is int and type(y.ids) is np.ndarray
            elif isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
            else:
                assert x == y and type(x) is type(y)
    ref = batches(ref_train)
    assert ref == batches(first) == batches(train)
    assert (
        train.report == first.report == ref_train.report and train.report.lines() == ref_train.report.lines()
    )
    if ref_eval is not None:
        assert batches(ref_eval) == batches(ev) and ev.report == ref_eval.report
    else:
        assert ev is None


def test_key_changes_with_every_input(files, chatml_tok, make_tok, tmp_path):
    copy = tmp_path / "alpaca.json"
    copy.write_bytes((files / "alpaca.json").read_bytes())

    def key(d=None, kind="lm", seed=0, tok=chatml_tok):
        d = d or DataConfig(train=(str(copy),))
        return cache_key(d, kind, seed, [resolve(s, d.dataset_dir, d.format) for s in d.train], [], tok)[0]

    base = key()
    after_items = DataConfig(
        train=(str(copy),), packing=True, shuffle=False, bucket_multiple=8, num_workers=2
    )
    assert key(after_items) == base
    more_vocab = deepcopy(chatml_tok)
    more_vocab.add_tokens(["zzzq"])
    changed = [
        key(DataConfig(train=(str(copy),), cutoff_len=64)),
        key(DataConfig(train=(str(copy),), template="chatml")),
        key(DataConfig(train=(str(copy),), template_kwargs={"enable_thinking": False})),
        key(DataConfig(train=(str(copy),), val_size=0.1)),
        key(DataConfig(train=(str(copy),), on_error="skip")),
        key(DataConfig(train=(str(copy),), format="alpaca")),
        key(kind="prompt"),
        key(seed=1),
        key(tok=make_tok("{{ messages }}", eos_token="<|im_end|>", pad_token="<|endoftext|>")),  # template
        key(tok=make_tok(chatml_tok.chat_template, eos_token="<|endoftext|>")),  # special tokens
        key(tok=more_vocab),
    ]
    copy.write_bytes(copy.read_bytes().replace(b"Question 1?", b"Question 1!"))  # one byte of content
    changed.append(key())
    assert len({base, *changed}) == len(changed) + 1


def _array(d):
    return sorted(d.glob("train0.ids.npy"))[0]


DAMAGE = {
    "deleted array": lambda d: _array(d).unlink(),
    "truncated array": lambda d: _array(d).write_bytes(_array(d).read_bytes()[:-4]),
    "flipped bytes": lambda d: _array(d).write_bytes(_array(d).read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f"),
    "no manifest": lambda d: (d / cache.MANIFEST).unlink(),
    "garbage manifest": lambda d: (d / cache.MANIFEST).write_text('{"key": "x", garbage'),
    "edited manifest": lambda d: (d / cache.MANIFEST).write_text(
        (d / cache.MANIFEST).read_text().replace('"items": ', '"items": 1')
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_rebuilt_never_read(files, chatml_tok, tmp_path, caplog, damage):
    first, _ = build(files, "lm_packed", chatml_tok, cache_dir=str(tmp_path))
    ref = batches(first)
    DAMAGE[damage](first.cache.dir)
    with caplog.at_level(logging.INFO, logger="jaxtune.data"):
        again, _ = build(files, "lm_packed", chatml_tok, cache_dir=str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(first.cache.dir) in warnings[0]
    assert not again.cache.hit and batches(again) == ref  # rebuilt, not read
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.cache.dir.name]  # no trash left behind
    assert cache.open_dir(again.cache.dir, json.loads((again.cache.dir / cache.MANIFEST).read_text())["key"])


def test_a_lost_rename_race_keeps_the_winner(files, chatml_tok, tmp_path):
    first, _ = build(files, "lm", chatml_tok, cache_dir=str(tmp_path))
    final = first.cache.dir
    key = json.loads((final / cache.MANIFEST).read_text())["key"]
    loser = tmp_path / (final.name + ".tmp-loser")
    shutil.copytree(final, loser)
    manifest, _ = cache._publish(loser, final, key)
    assert not loser.exists() and manifest["key"] == key
    old, fresh = tmp_path / (final.name + ".tmp-killed"), tmp_path / (final.name + ".tmp-building")
    old.mkdir(), fresh.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    cache._sweep(final)  # a build first removes what killed builds of its key left, a day on
    assert not old.exists() and fresh.exists() and final.exists()


def test_two_workers_equal_one_and_skips_merge(files, chatml_tok, tmp_path):
    src = str(files / "chat.jsonl")
    one, _ = pipeline.iterators(src, chatml_tok, 2, "lm", on_error="skip", cache_dir=str(tmp_path / "a"))
    two, _ = pipeline.iterators(
        src, chatml_tok, 2, "lm", on_error="skip", num_workers=2, cache_dir=str(tmp_path / "b")
    )
    assert two.cache.workers == 2 and one.cache.dir.name == two.cache.dir.name
    names = sorted(p.name for p in one.cache.dir.glob("*.npy"))
    assert names == sorted(p.name for p in two.cache.dir.glob("*.npy")) and names
    for name in names:
        assert (one.cache.dir / name).read_bytes() == (two.cache.dir / name).read_bytes(), name
    assert one.policy.skipped == two.policy.skipped == {"no response": 7}
    assert one.report == two.report and batches(one) == batches(two)


def test_a_data_error_in_a_worker_is_the_same_error(files, chatml_tok, tmp_path):
    src = str(files / "chat.jsonl")
    with pytest.raises(DataError) as in_process:
        pipeline.iterators(src, chatml_tok, 2, "lm", cache=False)
    with pytest.raises(DataError) as in_worker:
        pipeline.iterators(src, chatml_tok, 2, "lm", num_workers=2, cache_dir=str(tmp_path))
    e = in_worker.value
    assert str(e) == str(in_process.value) and (e.file, e.row, e.reason) == (src, 3, "no response")
    assert not list(tmp_path.iterdir())  # nothing half-built left


def test_prepare_command_then_training_maps_it(files, chatml_tok, tmp_path, capsys, monkeypatch):
    chatml_tok.save_pretrained(tmp_path / "tok")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"stage: sft\nmodel: {{tokenizer: {tmp_path / 'tok'}}}\n"
        f"data: {{train: [{files / 'alpaca.json'}], cache_dir: {tmp_path / 'cache'}, val_size: 4}}\n"
    )
    assert cli.main(["data", "prepare", str(config), "seed=3"]) == 0
    out = capsys.readouterr().out
    assert (
        "tokenised cache: " + str(tmp_path / "cache") in out
        and "train: 36 items" in out
        and "eval: 4 items" in out
    )
    cfg = load_config(str(config), ["seed=3"])
    from transformers import AutoTokenizer

    no_tokenising(monkeypatch)
    train, ev = pipeline.build(
        cfg.data, AutoTokenizer.from_pretrained(tmp_path / "tok"), 4, "lm", seed=cfg.seed
    )
    assert train.cache.hit and len(ev.order.datasets[0]) == 4
    assert (
        cli.main(["data", "prepare", str(config), "seed=3"]) == 0
        and "found (already prepared)" in capsys.readouterr().out
    )
    assert cli.main(["data", "prepare", str(config), "data.streaming=true"]) == 2
    assert capsys.readouterr().err.startswith("jaxtune: error: data.streaming reads the data lazily")


@pytest.mark.parametrize("case", ["lm_packed", "pair"])
def test_resume_over_a_mapped_dataset(files, chatml_tok, tmp_path, case):
    build(files, case, chatml_tok, cache_dir=str(tmp_path))
    whole, _ = build(files, case, chatml_tok, cache_dir=str(tmp_path), window=5)
    assert whole.cache.hit
    ref = batches(whole, 14)
    part, _ = build(files, case, chatml_tok, cache_dir=str(tmp_path), window=5)
    head = batches(part, 5)
    state = json.loads(json.dumps(part.get_state()))
    resumed, _ = build(files, case, chatml_tok, cache_dir=str(tmp_path), window=5)
    resumed.set_state(state)
    assert head + batches(resumed, 9) == ref


def test_hosts_process_zero_builds_the_others_map(files, chatml_tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "signal", lambda name, value: calls.append(("signal", value)))
    monkeypatch.setattr(cache, "wait", lambda name: calls.append(("wait", None)) or "ready")
    monkeypatch.setattr(cache, "hosts", lambda: (0, 2))
    zero, _ = build(files, "kto", chatml_tok, cache_dir=str(tmp_path / "shared"))
    assert calls == [("signal", "ready")] and not zero.cache.hit
    ref = batches(zero)
    monkeypatch.setattr(cache, "hosts", lambda: (1, 2))
    with monkeypatch.context() as m:
        no_tokenising(m)
        one, _ = build(files, "kto", chatml_tok, cache_dir=str(tmp_path / "shared"))
    assert calls[1] == ("wait", None) and one.cache.hit and batches(one) == ref
    local, _ = build(files, "kto", chatml_tok, cache_dir=str(tmp_path / "host1"))  # a host-local empty dir
    assert not local.cache.hit and batches(local) == ref  # builds its own
    for f in zero.cache.dir.glob("*.npy"):
        assert f.read_bytes() == (local.cache.dir / f.name).read_bytes()
    monkeypatch.setattr(cache, "hosts", lambda: (0, 2))
    with pytest.raises(DataError):  # process 0 fails: the others are told, not left waiting
        pipeline.iterators(str(files / "alpaca.json"), chatml_tok, 3, "kto", cache_dir=str(tmp_path / "bad"))
    assert calls[-1] == ("signal", "failed")


def test_streaming_and_cache_off_write_nothing(files, chatml_tok, tmp_path):
    s, _ = pipeline.iterators(
        str(files / "alpaca.json"), chatml_tok, 2, "lm", streaming=True, cache_dir=str(tmp_path)
    )
    off, _ = pipeline.iterators(
        str(files / "alpaca.json"), chatml_tok, 2, "lm", cache=False, cache_dir=str(tmp_path)
    )
    assert s.cache is None and off.cache is None and not list(tmp_path.iterdir())
    assert len(batches(s, 3)) == 3
    with pytest.raises(ConfigError, match="num_workers"):
        DataConfig(num_workers=0)


HOST = """
import hashlib, json, sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id={pid})
from transformers import AutoTokenizer
from jaxtune.data import items, pipeline
if {pid} == 1:  # the shared directory is built by process 0: this one must only map it
    items.Encoder._items = lambda *a, **k: sys.exit("process 1 tokenised")
train, _ = pipeline.iterators({src!r}, AutoTokenizer.from_pretrained({tok!r}), 3, "lm", cache_dir={cache!r})
b = next(train)
print(json.dumps({{"hit": train.cache.hit, "batch": hashlib.sha1(b.input_ids.tobytes()).hexdigest()}}))
"""


@pytest.mark.skipif(
    not os.environ.get("JAXTUNE_TEST_MULTIHOST_DATA"),
    reason="two JAX processes take ~20-60 s on 2 cores (over the suite's budget); JAXTUNE_TEST_MULTIHOST_DATA=1 runs it",
)
def test_two_real_processes_share_one_cache(files, chatml_tok, tmp_path):
    """jax.distributed on two local CPU processes: process 0 builds, process 1 waits for its signal, then maps."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chatml_tok.save_pretrained(tmp_path / "tok")
    args = dict(
        port=port, src=str(files / "alpaca.json"), tok=str(tmp_path / "tok"), cache=str(tmp_path / "c")
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", HOST.format(pid=pid, **args)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for pid in (0, 1)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    zero, one = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert (zero["hit"], one["hit"]) == (False, True) and zero["batch"] == one["batch"]


class _DiesOnArrival:
    """Unpickling it ends the process: a worker killed mid-task (OOM killer, a script without a main guard)."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_worker_that_dies_is_one_error_naming_num_workers(chatml_tok, tmp_path):
    options = {"on_error": "raise"}
    tasks = [("train0", k, [_DiesOnArrival()], str(tmp_path)) for k in range(2)]
    with workers.Pool(chatml_tok, "lm", options, 2) as pool, pytest.raises(RunError, match="num_workers=1"):
        list(pool.run(tasks))


def test_other_data_code_makes_another_key(files, chatml_tok, monkeypatch):
    from jaxtune.data import fingerprint

    d = DataConfig(train=(str(files / "alpaca.json"),))
    key = lambda: cache_key(d, "lm", 0, [resolve(s, None, None) for s in d.train], [], chatml_tok)[0]
    before = key()
    monkeypatch.setattr(fingerprint, "_code", lambda: "an upgraded jaxtune/data")
    assert key() != before
