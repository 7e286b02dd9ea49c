"""Cross-field and later-stage config errors name the YAML file, the key and its line (or the command-line
override that set it), as the single-field ones do; through the CLI each is one `jaxtune: error:` paragraph,
exit status 2, no traceback."""

from __future__ import annotations

import dataclasses

import pytest

from jaxtune import cli
from jaxtune.config import ConfigError, RunConfig, config_error, load_config, to_dict
from jaxtune.errors import RunError
from jaxtune.models.safetensors_io import CheckpointError

TINY_INIT = ("  random_init: {model_type: llama, vocab_size: 64, hidden_size: 16, intermediate_size: 32, "
             "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}\n")  # fmt: skip


def write(tmp_path, text: str, name: str = "x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def base(tmp_path, stage: str = "sft", method: str = "lora", extra: str = "") -> str:
    """A run config whose line 7 is `  name: <method>` and line 1 `stage: <stage>`."""
    return (f"stage: {stage}\noutput_dir: {tmp_path / 'run'}\nmodel:\n  tokenizer: 'builtin:chars'\n"
            f"{TINY_INIT}method:\n  name: {method}\ndata:\n  train: ['builtin:demo']\n{extra}")  # fmt: skip


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("jaxtune: error:") == 1, err
    assert err.startswith("jaxtune: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "stage, method, extra, key, line, message",
    [
        ("rm", "prefix", "", "method.name", 7, "method.name prefix does not fit stage rm with training.export_hf=true"),
        ("rm", "lora\n  combine: [adapter]", "", "method.combine", 8, "method.combine adapter does not fit stage rm"),
        ("dpo", "lora", "  packing: true\n", "data.packing", 10, "data.packing is for stages pt and sft; stage dpo"),
        ("kto", "lora", "dpo:\n  precompute_ref_log_probs: true\n", "dpo.precompute_ref_log_probs", 11,
         "dpo.precompute_ref_log_probs cannot go with stage kto"),
        ("dpo", "full", "dpo:\n  reference: adapters_off\n", "dpo.reference", 11,
         "dpo.reference is adapters_off, but method full trains base parameters"),
        ("dpo", "lora", "dpo:\n  loss_type: kto\n", "dpo.loss_type", 11, "dpo.loss_type is kto"),
        ("sft", "lora", "training:\n  warmup_steps: 3\n  warmup_ratio: 0.1\n", "training.warmup_steps", 11,
         "training.warmup_steps and training.warmup_ratio are both set"),
        ("sft", "full\n  combine: [prefix, lora]", "", "method.combine", 8,
         "method.combine puts lora beside full fine-tuning, which already trains every weight they would adapt"),
    ],
)  # fmt: skip
def test_cross_field_error_names_file_key_and_line(tmp_path, capsys, stage, method, extra, key, line, message):
    path = write(tmp_path, base(tmp_path, stage, method, extra))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(err.value).endswith(f"({path}, line {line}).")
    assert cli.main(["train", str(path)]) == 2
    assert f"jaxtune: error: {message}" in one_error(capsys)


def test_the_same_check_set_by_an_override(tmp_path, capsys):
    path = write(tmp_path, base(tmp_path, "rm"))
    assert cli.main(["train", str(path), "method.name=prompt"]) == 2
    err = one_error(capsys)
    assert "method.name prompt does not fit stage rm" in err
    assert err.rstrip().endswith("(command-line override 'method.name=prompt').")


def test_rm_keeps_virtual_tokens_without_export(tmp_path):
    cfg = load_config(write(tmp_path, base(tmp_path, "rm", "prefix", "training:\n  export_hf: false\n")))
    assert cfg.method.name == "prefix"


def test_config_error_locates_keys_after_loading(tmp_path):
    path = write(tmp_path, base(tmp_path, extra="training:\n  best_metric: eval_acc\n"))
    cfg = load_config(path, ["training.batch_size=4"])
    assert str(config_error(cfg, "method.name", "x")) == f"method.name x ({path}, line 7)."
    assert str(config_error(cfg, "training.batch_size", "y")) == (
        "training.batch_size y (command-line override 'training.batch_size=4')."
    )
    # a section object and a key relative to it; the detail may name the key itself
    assert str(config_error(cfg.training, "best_metric", "training.best_metric=1: z", RunError)) == (
        f"training.best_metric=1: z ({path}, line 11)."
    )
    assert isinstance(config_error(cfg, "seed", "w", RunError), RunError)
    # dataclasses.replace drops the attribute on the new instance; the sections it kept still know
    replaced = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=("a.json",)))
    assert config_error(replaced, "method.name", "x").args[0].endswith(f"({path}, line 7).")
    # loading a loaded config again (with more overrides) keeps its file
    again = load_config(cfg, ["seed=3"])
    assert config_error(again, "method.name", "x").args[0].endswith(f"({path}, line 7).")
    assert config_error(again, "seed", "x").args[0].endswith("(command-line override 'seed=3').")
    # not a field: equality and to_dict ignore where the values came from
    assert cfg == load_config(to_dict(cfg)) and "origin" not in str(to_dict(cfg))
    assert str(config_error(RunConfig(), "method.name", "x")) == "method.name x."


def test_later_checks_name_the_key_and_line(tmp_path):
    from jaxtune.methods import grpo
    from jaxtune.train import loop

    text = base(tmp_path, "grpo", extra="grpo:\n  reward_fns: [exact_match]\n  mini_batch_size: 3\n"
                "training:\n  best_metric: eval_acc\n")  # fmt: skip
    path = write(tmp_path, text)
    cfg = load_config(path)
    with pytest.raises(RunError, match=rf"^grpo.mini_batch_size=3 must divide .* \({path}, line 12\)\.$"):
        grpo.schedule(cfg)
    with pytest.raises(RunError, match=rf"^training.best_metric='eval_acc': eval reports \['eval_loss'\] \({path}, line 14\)"):
        loop._early_stop({"loss": 1.0}, {"history": []}, cfg.training, 1)


def test_reward_model_directory_errors_name_the_key(tmp_path):
    from jaxtune import demo
    from jaxtune.methods import ppo

    path = write(tmp_path, base(tmp_path, "ppo", extra=f"ppo:\n  reward_model: {tmp_path / 'rm'}\n"))
    cfg = load_config(path)
    with pytest.raises(CheckpointError) as err:
        ppo._reward_model(cfg, demo.char_tokenizer())
    msg = str(err.value)
    assert msg.startswith(f"ppo.reward_model={tmp_path / 'rm'}: {tmp_path / 'rm'}: no such directory")
    assert msg.endswith(f"({path}, line 11).")


def test_peft_setting_the_model_lacks_names_the_key(tmp_path, capsys):
    path = write(tmp_path, base(tmp_path, extra="  cutoff_len: 16\n") .replace(
        "  name: lora\n", "  name: lora\n  target_modules: [nope_proj]\n"))  # fmt: skip
    assert cli.main(["estimate", str(path)]) == 2
    err = one_error(capsys)
    assert "method.target_modules=['nope_proj'] matches no module of this llama model" in err
    assert err.rstrip().endswith(f"({path}, line 8).")


def test_setup_errors_about_a_key_get_its_line(tmp_path, capsys):
    from jaxtune.config_rules import locating

    path = write(tmp_path, base(tmp_path, extra="training:\n  batch_size: 6\nparallel:\n  fsdp: 4\n"))
    cfg = load_config(path)
    with pytest.raises(RunError, match=rf"^training.batch_size=6 does not split \({path}, line 11\)\.$"):
        with locating(cfg):
            raise RunError("training.batch_size=6 does not split.")
    with pytest.raises(RunError, match=r"^no key named here\.$"):
        with locating(cfg):
            raise RunError("no key named here.")
    assert cli.main(["train", str(path)]) == 2  # a mesh larger than this machine
    err = one_error(capsys)
    assert "parallel.data=-1" in err and err.rstrip().endswith(f"({path}, line 12).")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"stage: sft\nmodel:\n  path: \xff\xfe\n", "not UTF-8 text (byte 26, line 3); save it as UTF-8."),
        (b"training.learning_rate: 1e-4\n", "key 'training.learning_rate' ({path}, line 1): write it nested "
                                            "(training: {{learning_rate: ...}})"),
        (b"model: {path: x}\nmodel.path: y\n", "key 'model.path' ({path}, line 2): write it nested"),
    ],
)  # fmt: skip
def test_malformed_files(tmp_path, capsys, content, message):
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    assert cli.main(["estimate", str(path)]) == 2
    assert message.format(path=path) in one_error(capsys)
    assert cli.main(["train", str(tmp_path)]) == 2
    assert f"config file '{tmp_path}' is a directory, not a YAML file" in one_error(capsys)


@pytest.mark.parametrize(
    "init, message",
    [
        ("{model_type: bert}", "model.random_init: model_type 'bert' is not supported; jaxtune supports: "),
        ("{hidden_size: 8}", "model.random_init needs a `model_type`"),
        ("{model_type: llama, hidden_size: 0}", "model.random_init: hidden_size must be a positive integer, got 0"),
    ],
)
def test_random_init_errors_name_the_key(tmp_path, capsys, init, message):
    path = write(tmp_path, f"model:\n  tokenizer: 'builtin:chars'\n  random_init: {init}\n")
    assert cli.main(["estimate", str(path)]) == 2
    err = one_error(capsys)
    assert message in err and err.rstrip().endswith(f"({path}, line 3).")
