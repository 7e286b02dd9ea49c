"""The configure form is the YAML path: for every field the form shows, an invalid value gives the error a YAML
file with that value gives, word for word (file and line included), attached to that field; valid values
compose into a YAML file that `load_config` reads back to the config the fields describe, and the command
line shown trains the same config."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from jaxtune import cli
from jaxtune.board import form
from jaxtune.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
CANDIDATES = ("abc", "-5", "0", "[1, 2]", "{a: 1}", "1.5", "true", "2")


def _yaml_error(tmp_path: Path, key: str, text: str, name: str) -> str | None:
    """The ConfigError of the demo YAML file with `key` set to `text` (as a YAML value), or None if valid."""
    mapping = form.compose(DEMO, {})
    form._set(mapping, key, form.parse(text, "text"))
    path = tmp_path / name
    path.write_text(form.yaml_text(mapping))
    try:
        load_config(path)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("key", [k for k, w in form.FIELDS if w == "text"])
def test_every_text_field_reports_the_yaml_error_beside_itself(key, tmp_path):
    _, cfg = form.base_mapping(DEMO)
    shown = form.values_of(cfg)
    for text in CANDIDATES:
        expected = _yaml_error(tmp_path, key, text, "board.yaml")
        if expected is None or not expected.startswith(key):
            continue
        checked = form.validate(form.yaml_text(form.compose(DEMO, {**shown, key: text})), "runs/board.yaml")
        assert checked.cfg is None
        assert checked.errors == {key: expected.replace(str(tmp_path / "board.yaml"), "runs/board.yaml")}
        assert "(runs/board.yaml, line " in checked.errors[key]
        return
    pytest.fail(f"no candidate value is invalid for {key}: {CANDIDATES}")


def test_cross_field_errors_land_on_the_field_they_name():
    _, cfg = form.base_mapping(DEMO)
    values = {**form.values_of(cfg), "method.name": "qlora"}  # qlora without model.quantization
    checked = form.validate(form.yaml_text(form.compose(DEMO, values)), "x.yaml")
    assert list(checked.errors) == ["method.name"]
    assert "set model.quantization to nf4 or int8" in checked.errors["method.name"]
    values = {**values, "method.name": "prefix", "stage": "rm"}
    checked = form.validate(form.yaml_text(form.compose(DEMO, values)), "x.yaml")
    assert list(checked.errors) == ["method.name"] and "does not fit stage rm" in checked.errors["method.name"]
    checked = form.validate(form.yaml_text(form.compose(DEMO, {}, "training.bogus=1")), "x.yaml")
    assert list(checked.errors) == [""] and "unknown key 'training.bogus'" in checked.errors[""]


def test_form_yaml_and_command_train_the_same_config(tmp_path, monkeypatch):
    _, cfg = form.base_mapping(DEMO)
    values = {**form.values_of(cfg), "training.learning_rate": "1e-3", "method.name": "lora", "method.rank": "4",
              "method.target_modules": "[q_proj, k_proj, v_proj]", "data.packing": True, "output_dir": "runs/x",
              "data.train": ["builtin:demo", "extra.json"]}  # fmt: skip
    mapping = form.compose(DEMO, values, "training.warmup_steps=3\n# a comment\n\n")
    path = tmp_path / "board.yaml"
    path.write_text(form.yaml_text(mapping))
    loaded = load_config(path)
    assert loaded.training.learning_rate == 1e-3 and loaded.method.name == "lora" and loaded.method.rank == 4
    assert loaded.method.target_modules == ("q_proj", "k_proj", "v_proj") and loaded.data.packing
    assert loaded.data.train == ("builtin:demo", "extra.json") and loaded.training.warmup_steps == 3
    assert loaded.model == cfg.model  # untouched fields keep the base file's values
    assert form.values_of(loaded) == {**values, "training.learning_rate": "0.001"}
    # the command line (base config + overrides) resolves to the same config as the saved file
    saved, overrides = form.train_command(DEMO, mapping, path).splitlines()
    assert saved == f"jaxtune train {shlex.quote(str(path))}"
    argv = shlex.split(overrides)[1:]
    seen = {}
    monkeypatch.setattr(cli, "_target", lambda command: lambda c: seen.setdefault("cfg", c) and 0)
    cli.main(argv)
    assert seen["cfg"] == loaded


def test_unchanged_form_is_the_base_file():
    assert form.compose(DEMO, form.values_of(load_config(DEMO))) == form.base_mapping(DEMO)[0]
    assert form.compose(None, form.values_of(load_config(None))) == {}


def test_field_visibility_follows_stage_and_method():
    assert form.visible("method.rank", "sft", "lora") and not form.visible("method.rank", "sft", "full")
    assert form.visible("model.quantization", "sft", "qlora") and not form.visible("dpo.beta", "sft", "lora")
    assert form.visible("dpo.beta", "dpo", "lora") and form.visible("training.learning_rate", "ppo", "full")
    assert set(form.choices("method.name")) >= {"lora", "qlora", "full", "prefix"}
    assert form.choices("stage") == ["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]


def test_text_fields_keep_what_was_typed():
    """A string field's text is never read as a number (YAML would make output_dir 007 the string "7")."""
    _, cfg = form.base_mapping(DEMO)
    values = {**form.values_of(cfg), "output_dir": "runs/007", "data.template": "007", "model.tokenizer": "true"}
    loaded = form.validate(form.yaml_text(form.compose(DEMO, values)), "x.yaml").cfg
    assert (loaded.output_dir, loaded.data.template, loaded.model.tokenizer) == ("runs/007", "007", "true")
    checked = form.validate(form.yaml_text(form.compose(DEMO, {**values, "training.batch_size": "007"})), "x.yaml")
    assert checked.cfg.training.batch_size == 7  # a number field reads numbers as before
