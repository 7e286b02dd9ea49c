"""A corpus of malformed model directories, safetensors files and adapters, each built here: every one is a
`JaxtuneError` naming the directory or file (and the tensor), read before any tensor is, and through the CLI one
`jaxtune: error:` paragraph, exit status 2, no traceback."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import jaxtune
from jaxtune import cli
from jaxtune.models import CheckpointError, UnsupportedModelError, hf
from jaxtune.models.safetensors_io import Lazy, SafetensorsReader, read_header, write_file

TINY = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip


# ----------------------------------------------------------------------------------------- safetensors files


def _file(path, header: dict, data: bytes, length: int | None = None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _good(path):
    """a: F32 [4] (bytes 0..16), b: F32 [2, 3] (bytes 16..40)."""
    write_file(path, [Lazy("a", (4,), np.float32, lambda: np.arange(4)),
                      Lazy("b", (2, 3), np.float32, lambda: np.ones((2, 3)))])  # fmt: skip
    return path


HEADER = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 40]}}  # fmt: skip


def _with(name, **changes) -> dict:
    return {**HEADER, name: {**HEADER[name], **changes}}


@pytest.mark.parametrize(
    "header, extra, message",
    [
        (_with("a", dtype="F33"), 0, r"tensor 'a': unknown dtype 'F33' \(known: F64, F32"),
        (_with("a", shape=[5]), 0, r"tensor 'a': data_offsets \[0, 16\] span 16 bytes, but F32 \[5\] needs 20"),
        (_with("b", dtype="F16"), 0, r"tensor 'b': data_offsets \[16, 40\] span 24 bytes, but F16 \[2, 3\] needs 12"),
        (_with("b", data_offsets=[8, 32]), 0, r"tensor 'b': data_offsets \[8, 32\] overlaps tensor 'a', which ends at 16"),
        (_with("b", data_offsets=[100, 124]), 0, r"tensor 'b': data_offsets \[100, 124\] leaves a gap after tensor 'a'"),
        (_with("b", data_offsets=[40, 16]), 0, r"tensor 'b': data_offsets \[40, 16\] are not \[begin, end\]"),
        (_with("a", shape=["4"]), 0, r"tensor 'a': shape \['4'\] is not a list of non-negative integers"),
        ({**HEADER, "c": [1, 2]}, 0, r"tensor 'c': header entry is not \{dtype, shape, data_offsets\}"),
        (HEADER, 7, r"7 bytes after the last tensor \(a damaged or concatenated file\)"),
        (HEADER, -5, r"truncated: \d+ bytes, the header describes \d+ \(its last tensor, 'b', ends there\); re-download"),
    ],
)  # fmt: skip
def test_header_that_does_not_describe_the_file(tmp_path, header, extra, message):
    """`extra`: data bytes beyond (or, negative, short of) the 40 the header describes."""
    path = _file(tmp_path / "model.safetensors", header, bytes(40 + extra))
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsReader(tmp_path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("keep", [0, 4, 12, -1, -20])
def test_truncated_file_says_truncated(tmp_path, keep):
    """An interrupted download, cut in the length, in the JSON header, or in the data."""
    path = _good(tmp_path / "model.safetensors")
    whole = path.read_bytes()
    path.write_bytes(whole[:keep])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated: {len(whole[:keep])} bytes") as err:
        read_header(path)
    assert "re-download" in str(err.value)
    if keep < 0:
        assert f"the header describes {len(whole)}" in str(err.value)


def test_header_length_and_json_checked(tmp_path):
    path = _file(tmp_path / "x.safetensors", HEADER, bytes(40), length=2**40)
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(its first 8 bytes give a header length"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 6) + b"{oops}" + bytes(8))
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header, not JSON"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        read_header(path)


def test_unreadable_file(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'model.safetensors'}: cannot be read \(Is a directory"):
        read_header(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no \*.safetensors weights"):
        SafetensorsReader(tmp_path)


def test_a_good_file_reads(tmp_path):
    """The checks accept what the writer (and transformers, below) writes."""
    reader = SafetensorsReader(_good(tmp_path / "model.safetensors").parent)
    np.testing.assert_array_equal(reader.get("a"), np.arange(4, dtype=np.float32))
    assert reader.shape("b") == (2, 3)


# ----------------------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama directory (one file) and the same model in three shards with an index."""
    import jax

    from jaxtune.models.families import arch_from_hf
    from jaxtune.models.model import Model, init_params

    arch = arch_from_hf(TINY)  # random values of the right shapes: nothing to compile
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(arch, 0))
    model = Model(arch=arch, params=jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes),
                  tokenizer=None, hf_config=dict(TINY))  # fmt: skip
    one, sharded = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("sharded")
    hf.save_model(model, one)
    hf.save_model(model, sharded, max_shard_size=4000)
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    return model, one, sharded


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "model")


def test_real_checkpoints_load(saved):
    model, one, sharded = saved
    for d in (one, sharded):
        loaded = jaxtune.load_model(d)
        np.testing.assert_array_equal(loaded.params["embed_tokens"]["embedding"], model.params["embed_tokens"]["embedding"])


def test_truncated_model_safetensors(saved, tmp_path):
    d = _copy(saved[1], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{d / 'model.safetensors'}: truncated: {len(data) // 2} bytes"):
        jaxtune.load_model(d)


def test_sharded_index_errors(saved, tmp_path):
    d = _copy(saved[2], tmp_path)
    index = d / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    shards = sorted(set(original["weight_map"].values()))
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{index}: lists shard {shards[1]}, which is missing from {d}"):
        jaxtune.load_model(d)
    shutil.copy(saved[2] / shards[1], d / shards[1])
    held = [f for f in original["weight_map"].values()]
    home = next(f for f in shards if held.count(f) > 1)  # moving one of its tensors keeps the shard listed
    name, other = next(n for n, f in original["weight_map"].items() if f == home), next(f for f in shards if f != home)
    index.write_text(json.dumps({"weight_map": {**original["weight_map"], name: other}}))
    with pytest.raises(CheckpointError, match=rf"{index}: places tensor '{name}' in {other}, which does not "
                                              rf"hold it \(it is in {home}\)"):  # fmt: skip
        jaxtune.load_model(d)
    index.write_text('{"weight_map": {\n  "a": "b",\n}}')
    with pytest.raises(CheckpointError, match=rf"{index}: invalid JSON at line 3, column 1"):
        jaxtune.load_model(d)
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(CheckpointError, match=r'needs a "weight_map" object'):
        jaxtune.load_model(d)


def test_shard_truncated_and_shape_mismatch_name_the_shard(saved, tmp_path):
    d = _copy(saved[2], tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated"):
        jaxtune.load_model(d)
    shutil.copy(saved[2] / shard.name, shard)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError) as err:
        jaxtune.load_model(d)
    msg = str(err.value)
    assert msg.startswith(f"{d}: checkpoint does not match its config.json")
    assert "tensor model.layers.0.mlp.up_proj.weight has shape (32, 16), config.json implies (48, 16) (in model-" in msg


def _config_json(tmp_path, text: str):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(text)
    return d


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ('{"model_type": "bert"}', UnsupportedModelError,
         r"config.json: model_type 'bert' is not supported; jaxtune supports: .*llama.*mixtral"),
        ('{\n  "model_type": "llama",\n  "hidden_size": 8,,\n}', CheckpointError,
         r"config.json: invalid JSON at line 3, column 20"),
        ('{"hidden_size": 8}', CheckpointError, r'config.json: no "model_type" \(a string such as "llama"\); .*qwen3'),
        ('["llama"]', CheckpointError, r"config.json: must hold a JSON object \(HF config keys\), got a list"),
        ('{"model_type": "llama", "architectures": "LlamaForCausalLM"}', CheckpointError,
         r'config.json: "architectures" must be a list of class names'),
        (json.dumps({k: v for k, v in TINY.items() if k != "hidden_size"}), CheckpointError,
         r"config.json: no 'hidden_size', which a llama config must give"),
        (json.dumps({**TINY, "hidden_act": "swiglu9"}), UnsupportedModelError,
         r"config.json: activation 'swiglu9' is not supported"),
        (json.dumps({**TINY, "num_attention_heads": "2"}), CheckpointError,
         r"config.json: num_attention_heads must be a positive integer, got '2'"),
        (json.dumps({**TINY, "num_hidden_layers": 0}), CheckpointError,
         r"config.json: num_hidden_layers must be a positive integer, got 0"),
        (json.dumps({**TINY, "rope_scaling": "linear"}), CheckpointError,
         r"config.json: rope_scaling must be an object \(or null\), got 'linear'"),
        (json.dumps({**TINY, "model_type": "mistral", "sliding_window": "a"}), CheckpointError,
         r"config.json: a value jaxtune cannot use \(ValueError"),
    ],
)  # fmt: skip
def test_config_json_errors_name_the_file(tmp_path, text, kind, message):
    d = _config_json(tmp_path, text)
    with pytest.raises(kind, match=message) as err:
        jaxtune.load_model(d)
    assert str(d / "config.json") in str(err.value)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no config.json"):
        jaxtune.load_model(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'nope'}: no such directory"):
        jaxtune.load_model(tmp_path / "nope")
    d = _config_json(tmp_path, json.dumps(TINY))
    with pytest.raises(CheckpointError, match=rf"{d}: no \*.safetensors weights"):
        jaxtune.load_model(d)


def test_random_init_unknown_model_type():
    with pytest.raises(UnsupportedModelError, match=r"random_init: model_type 'bert9' is not supported; .*llama"):
        jaxtune.from_hf_config({"model_type": "bert9"})


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("tokenizer.json", '{"version": "1.0",\n "model": }', r"tokenizer.json: invalid JSON at line 2, column 11"),
        ("tokenizer_config.json", "[1]", r"tokenizer_config.json: must hold a JSON object"),
        ("tokenizer_config.json", '{"tokenizer_class": "NoSuchTokenizerFast"}',
         r": the tokenizer files there \(tokenizer_config.json\) do not load \(ValueError"),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}',
         r": the tokenizer files there \(tokenizer.json\) do not load"),
    ],
)  # fmt: skip
def test_broken_tokenizer_files_name_the_directory(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        hf.load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_truncated_adapter_safetensors(saved, tmp_path):
    from jaxtune import peft

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["q_proj"]}))  # fmt: skip
    weights = _good(tmp_path / "adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated"):
        peft.load_adapter(saved[0], tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no adapter_model.safetensors \(found adapter_model.bin"):
        peft.load_adapter(saved[0], tmp_path)


# ----------------------------------------------------------------------------------------- through the CLI


def one_error(capsys) -> str:
    """The CLI's error: one `jaxtune: error:` paragraph (one line), last on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("jaxtune: error:") == 1
    line = err.split("jaxtune: error: ", 1)[1]
    assert line.count("\n") == 1 and line.endswith("\n"), err
    return line


def _run_config(tmp_path, model_dir, extra: str = "") -> str:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"stage: sft\noutput_dir: {tmp_path / 'run'}\nmodel:\n  path: {model_dir}\n"
                   f"  tokenizer: 'builtin:chars'\ndata:\n  train: ['builtin:demo']\n{extra}")  # fmt: skip
    return str(cfg)


def test_cli_truncated_weights(saved, tmp_path, capsys):
    d = _copy(saved[1], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    cfg = _run_config(tmp_path, d)
    assert cli.main(["train", cfg, "training.max_steps=1"]) == 2
    msg = one_error(capsys)
    assert f"model.path={d}: {d / 'model.safetensors'}: truncated: {len(data) - 100} bytes" in msg
    assert f"({cfg}, line 4)" in msg


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_type": "bert"}', "config.json: model_type 'bert' is not supported; jaxtune supports: "),
        ('{"model_type": "llama",\n "vocab_size": 64 64}', "config.json: invalid JSON at line 2, column 19"),
    ],
)
def test_cli_estimate_bad_config_json(tmp_path, capsys, text, message):
    d = _config_json(tmp_path, text)
    cfg = _run_config(tmp_path, d)
    assert cli.main(["estimate", cfg]) == 2
    msg = one_error(capsys)
    assert str(d / "config.json") in msg and message in msg and f"({cfg}, line 4)" in msg


def test_cli_missing_tokenizer(saved, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: {saved[1]}}}\ndata: {{train: ['builtin:demo']}}\n")
    assert cli.main(["train", str(cfg)]) == 2
    msg = one_error(capsys)
    assert f"model.tokenizer is not set and {saved[1]} holds no tokenizer files (one of tokenizer.json" in msg
    assert f"({cfg}, line 2)" in msg
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{")
    assert cli.main(["train", str(cfg), f"model.tokenizer={tmp_path / 'tok'}"]) == 2
    msg = one_error(capsys)
    assert f"model.tokenizer={tmp_path / 'tok'}: {tmp_path / 'tok' / 'tokenizer.json'}: invalid JSON at line 1" in msg
    assert f"(command-line override 'model.tokenizer={tmp_path / 'tok'}')" in msg


def test_cli_export_when_the_base_model_is_damaged(saved, tmp_path, capsys):
    """The run's base directory, re-downloaded badly after training: export names it and the run's config line."""
    d = _copy(saved[1], tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",\n "vocab_size": 64,,}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"stage: sft\nmodel:\n  path: {d}\n  tokenizer: 'builtin:chars'\n")
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    msg = one_error(capsys)
    assert f"model.path={d}: {d / 'config.json'}: invalid JSON at line 2, column 19" in msg
    assert msg.rstrip().endswith(f"({run / 'config.yaml'}, line 3).")


def test_cli_data_inspect_broken_tokenizer(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerFast"}')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{tokenizer: {tmp_path / 'tok'}}}\ndata: {{train: [x.json]}}\n")
    assert cli.main(["data", "inspect", str(cfg)]) == 2
    assert f"{tmp_path / 'tok'}: the tokenizer files there (tokenizer_config.json) do not load" in one_error(capsys)
