"""jaxtune.config: YAML + overrides -> frozen dataclasses, round trips, and the wording of every error."""

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from jaxtune import config as C
from jaxtune.config import ConfigError, DataSource, RunConfig, dump_yaml, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(source, overrides)
    return str(e.value)


# ------------------------------------------------------------------------------------------- round trips

# Fields whose generic "other value" would break a cross-field rule, given coherent values instead.
EXPLICIT = {
    "stage": "pt",  # ppo/grpo would need a reward; pair stages exclude data.packing=true
    "method.name": "qlora",  # with model.quantization=nf4 below
    "method.combine": ("prefix",),
    "method.target_modules": ("q_proj", "k_proj", "o_proj"),
    "model.quantization": "nf4",
    "model.random_init": None,  # excludes model.path; checked separately below
    "data.train": (
        "alpaca_en_demo",
        DataSource(path="b.json", format="alpaca", ratio=2.0, columns={"prompt": "q"}),
    ),
    "data.eval": (DataSource(name="identity", split="test", max_samples=5, tags={"role_tag": "from"}),),
    "training.warmup_ratio": 0.0,  # excludes warmup_steps
    "training.micro_batch_size": 4,  # divides batch_size=16
    "parallel.coordinator_address": "10.0.0.1:1234",  # these three go together
    "parallel.num_processes": 4,
    "parallel.process_id": 3,
    "ppo.reward_fn": None,  # excludes reward_model
    "ppo.rollout_batch_size": 8,
    "ppo.mini_batch_size": 4,
    "dpo.label_smoothing": 0.25,
}


def other_value(tp, default):
    """A valid value of type `tp` that differs from `default`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return next(a for a in args if a != default)
    if type(None) in args:
        return other_value(next(a for a in args if a is not type(None)), default)
    if origin is tuple:
        return ("x_proj", "y.*")
    if origin is dict or tp is dict:
        return {"layers/0": 2.0} if args and args[1] is float else {"q_proj": 4}
    if tp is bool:
        return not default
    if tp is int:
        return 16 if default in (None, -1, 0) else default * 2
    if tp is float:
        return 0.25 if not default else default / 2
    if tp is str:
        return "other"
    raise AssertionError(f"no test value for {tp}")


def everything_changed() -> RunConfig:
    """A RunConfig in which every field of every section differs from its default."""
    sections = {}
    for f in dataclasses.fields(RunConfig):
        tp = C.typed_yaml.hints(RunConfig)[f.name]
        if not dataclasses.is_dataclass(tp):
            sections[f.name] = EXPLICIT[f.name] if f.name in EXPLICIT else other_value(tp, f.default)
            continue
        default = tp()
        values = {}
        for g in dataclasses.fields(tp):
            key, t = f"{f.name}.{g.name}", C.typed_yaml.hints(tp)[g.name]
            values[g.name] = EXPLICIT[key] if key in EXPLICIT else other_value(t, getattr(default, g.name))
        sections[f.name] = tp(**values)
    return RunConfig(**sections)


def test_every_field_differs_in_the_test_config():
    cfg, default = to_dict(everything_changed()), to_dict(RunConfig())
    same = [
        f"{s}.{k}"
        for s, v in cfg.items()
        if isinstance(v, dict)
        for k in v
        if v[k] == default[s][k] and f"{s}.{k}" not in EXPLICIT
    ]
    assert same == []


def test_defaults_round_trip():
    cfg = RunConfig()
    assert load_config(None) == cfg
    assert load_config(to_dict(cfg)) == cfg


@pytest.mark.parametrize("via", ["dict", "yaml", "overrides"])
def test_every_field_round_trips(tmp_path, via):
    cfg = everything_changed()
    if via == "dict":
        assert load_config(to_dict(cfg)) == cfg
    elif via == "yaml":
        path = tmp_path / "run" / "config.yaml"
        dump_yaml(cfg, path)
        assert load_config(path) == cfg
    else:  # every field as a `section.field=value` string; JSON is valid YAML flow syntax
        overrides = [
            f"{s}.{k}={json.dumps(v)}" if isinstance(vs, dict) else f"{s}={json.dumps(vs)}"
            for s, vs in to_dict(cfg).items()
            for k, v in (vs.items() if isinstance(vs, dict) else [(None, vs)])
        ]
        assert load_config(None, overrides) == cfg


def test_dump_yaml_quotes_strings_that_look_like_other_types(tmp_path):
    cfg = load_config({"run_name": "1e-4", "output_dir": "yes", "data": {"template": "null"}})
    assert cfg.run_name == "1e-4" and cfg.output_dir == "yes" and cfg.data.template == "null"
    assert load_config(dump_yaml(cfg, tmp_path / "c.yaml") and tmp_path / "c.yaml") == cfg


def test_configs_are_frozen_and_sequences_are_tuples():
    cfg = load_config(None, ["data.train=[a.json, b.json]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.learning_rate = 1.0
    assert cfg.data.train == ("a.json", "b.json")
    assert cfg.method.target_modules == ("q_proj", "v_proj")


def test_yaml_file_holds_only_differences(tmp_path):
    path = write(
        tmp_path, "stage: dpo\nmodel:\n  path: /ckpt\ntraining:\n  learning_rate: 5e-6\ndpo:\n  beta: 0.2\n"
    )
    cfg = load_config(path)
    assert cfg == RunConfig(
        stage="dpo",
        model=C.ModelConfig(path="/ckpt"),
        training=C.TrainingConfig(learning_rate=5e-6),
        dpo=C.DPOConfig(beta=0.2),
    )


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "training:\n  # learning_rate: 1\n")) == RunConfig()


def test_loading_does_not_touch_the_callers_dict():
    raw = {"training": {"learning_rate": 1e-3}}
    load_config(raw, ["training.learning_rate=2e-3"])
    assert raw == {"training": {"learning_rate": 1e-3}}


# ------------------------------------------------------------------------------------------- overrides


def test_overrides_parse_numbers_lists_bools_and_nested_keys():
    cfg = load_config(
        None,
        [
            "training.learning_rate=1e-4",  # a string in YAML 1.1, a float here
            "training.num_epochs=3",  # int -> float field
            "training.batch_size=16",
            "training.max_steps=1e3",  # integral float -> int field
            "model.scan_layers=false",
            "data.train=[a.json,b.json]",
            "method.target_modules=[q_proj,v_proj,o_proj]",
            "method.rank_pattern={q_proj: 16}",
            "model.random_init.model_type=llama",  # keys inside a dict field
            "model.random_init.hidden_size=64",
            "training.micro_batch_size=null",
            "seed=7",
        ],
    )
    t = cfg.training
    assert (t.learning_rate, t.num_epochs, t.batch_size, t.max_steps) == (1e-4, 3.0, 16, 1000)
    assert type(t.num_epochs) is float and type(t.max_steps) is int
    assert cfg.model.scan_layers is False
    assert cfg.data.train == ("a.json", "b.json")
    assert cfg.method.target_modules == ("q_proj", "v_proj", "o_proj")
    assert cfg.method.rank_pattern == {"q_proj": 16}
    assert cfg.model.random_init == {"model_type": "llama", "hidden_size": 64}
    assert t.micro_batch_size is None and cfg.seed == 7


def test_overrides_win_over_the_file_and_strings_stay_strings(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 1.0e-3\n")
    cfg = load_config(
        path,
        [
            "training.learning_rate=2e-3",
            "run_name=yes",  # YAML 1.1 would make this a bool
            "method.prompt_init_text=Answer: yes",  # not a mapping
            "data.train=single.json",  # one item where a list is expected
            "data.eval=[{path: e.json, format: alpaca, ratio: 2}]",
            "method.target_modules=all-linear",
        ],
    )
    assert cfg.training.learning_rate == 2e-3
    assert cfg.run_name == "yes" and cfg.method.prompt_init_text == "Answer: yes"
    assert cfg.data.train == ("single.json",)
    assert cfg.data.eval == (DataSource(path="e.json", format="alpaca", ratio=2.0),)
    assert cfg.method.target_modules == "all-linear"


def test_parallelism_is_an_alias_of_parallel():
    cfg = load_config({"parallelism": {"fsdp": 4}}, ["parallelism.tensor=2"])
    assert (cfg.parallel.fsdp, cfg.parallel.tensor) == (4, 2) and cfg.parallelism is cfg.parallel


@pytest.mark.parametrize("bad", ["training.learning_rate", "=1", "training..x=1", "a b=1"])
def test_malformed_override(bad):
    assert f"override '{bad}' must look like section.field=value" in error(None, [bad])


def test_override_into_a_value():
    assert error(None, ["seed.x=1"]).startswith("seed expects an integer but got dict")


# ------------------------------------------------------------------------------------------- errors


def test_unknown_key_names_dotted_key_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  path: /ckpt\ntraining:\n  learnig_rate: 1.0e-4\n")
    assert error(path) == (
        f"unknown key 'training.learnig_rate' ({path}, line 4); did you mean 'training.learning_rate'?"
    )


def test_unknown_key_in_an_override():
    assert error(None, ["training.batchsize=4"]) == (
        "unknown key 'training.batchsize' (command-line override 'training.batchsize=4'); "
        "did you mean 'training.batch_size'?"
    )


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    assert "unknown key 'training.beta'" in error({"training": {"beta": 0.1}})
    assert "did you mean 'dpo.beta'?" in error({"training": {"beta": 0.1}})
    assert "did you mean 'training.learning_rate'?" in error({"learning_rate": 1e-4})


def test_unknown_key_without_a_close_match_lists_valid_keys():
    msg = error({"rm": {"zzz": 1}})
    assert "unknown key 'rm.zzz'" in msg and "valid keys here: margin, center_rewards_coef." in msg


def test_unknown_key_inside_a_data_source(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - a.json\n    - path: b.json\n      fromat: alpaca\n")
    assert (
        error(path)
        == f"unknown key 'data.train[1].fromat' ({path}, line 5); did you mean 'data.train[1].format'?"
    )


def test_wrong_type_names_field_expected_type_and_value(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: fast\n")
    assert error(path) == f"training.learning_rate expects a number but got str 'fast' ({path}, line 2)."
    assert (
        error({"training": {"batch_size": 2.5}})
        == "training.batch_size expects an integer but got float 2.5."
    )
    assert "method.target_modules expects a string or a list (each a string) but got dict" in error(
        {"method": {"target_modules": {"q": 1}}}
    )
    assert error({"data": {"eval": [{"path": "x", "ratio": "lots"}]}}).startswith(
        "data.eval[0].ratio expects a number or null but got str 'lots'"
    )


@pytest.mark.parametrize("value", ["yes", "1", "on", "'true'"])
def test_booleans_are_strict(value):
    assert error(None, [f"model.scan_layers={value}"]).startswith(
        "model.scan_layers expects true or false but got"
    )


def test_invalid_choice_lists_choices_and_suggests():
    assert error(None, ["training.optimizer=adam"]) == (
        "training.optimizer must be one of 'adamw', 'adafactor', 'lion', 'sgd', got 'adam' "
        "(command-line override 'training.optimizer=adam'); did you mean 'adamw'?"
    )
    assert "method.combine[0] must be one of 'full', 'lora'" in error(None, ["method.combine=[lorra]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.warmup_ratio=1.5"], "training.warmup_ratio must be in [0, 1], got 1.5"),
        (["training.learning_rate=0"], "training.learning_rate must be > 0, got 0.0"),
        (["training.micro_batch_size=3"], "training.micro_batch_size must divide batch_size=8"),
        (["training.warmup_steps=10", "training.warmup_ratio=0.1"], "both set; keep one"),
        (
            ["method.name=qlora"],
            "method.name is qlora (LoRA over a quantised base), so set model.quantization",
        ),
        (
            ["method.name=full", "model.quantization=nf4"],
            "model.quantization cannot go with method.name=full",
        ),
        (["model.path=a", "model.random_init={model_type: llama}"], "model.path excludes model.random_init"),
        (["stage=ppo"], "ppo.reward_model or ppo.reward_fn is needed by stage ppo"),
        (["stage=grpo"], "grpo.reward_fns is empty; stage grpo needs one"),
        (["grpo.num_generations=1"], "grpo.num_generations must be >= 2"),
        (["parallel.data=0"], "parallel.data must be -1 (remaining devices) or >= 1, got 0"),
        (["parallel.num_processes=2"], "parallel.coordinator_address goes with parallel.num_processes"),
        (["method.frozen_patterns=['(']"], "method.frozen_patterns holds an invalid regular expression '('"),
        (["data.train=[{format: alpaca}]"], "data.train[0].path or name: give exactly one of them"),
        (["generation.top_p=0"], "generation.top_p must be in (0, 1], got 0.0"),
    ],
)
def test_cross_field_checks(overrides, message):
    msg = error(None, overrides)
    assert message in msg and ("command-line override" in msg or overrides[0].startswith("stage"))


def test_checks_also_run_on_direct_construction():
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        C.TrainingConfig(learning_rate=-1.0)
    assert issubclass(ConfigError, ValueError)
    assert C.TrainingConfig(batch_size=16, micro_batch_size=4).accumulation_steps == 4


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  path: /ckpt\n training: 3\n")
    msg = error(path)
    assert msg.startswith(f"could not parse {path}, line 3, column 2 ('training: 3'):")
    assert "\n" not in msg


def test_file_problems(tmp_path):
    assert error(tmp_path / "nope.yaml").startswith(f"config file '{tmp_path / 'nope.yaml'}' not found")
    path = write(tmp_path, "- a\n- b\n")
    assert error(path) == f"{path} must be a mapping of sections (section: {{field: value}}), got list."
    path = write(tmp_path, "training:\n  seed: 1\n  seed: 2\n")
    assert error(path) == f"key 'training.seed' appears twice in {path} (lines 2 and 3); keep one."


def test_importing_config_does_not_import_jax():
    code = "import sys, jaxtune.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_output_dir_url_says_to_mount_the_bucket():
    with pytest.raises(ConfigError, match=r"output_dir is a URL; .*gcsfuse.*got 'gs://bucket/run'"):
        load_config({"output_dir": "gs://bucket/run"})
