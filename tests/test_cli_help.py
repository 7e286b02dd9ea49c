"""The `jaxtune` command line: help for every command, dispatch, and user-facing errors (no JAX needed)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxtune import cli
from jaxtune.config import GenerationConfig, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "export", "generate", "chat", "data", "plot", "estimate"]


def jaxtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "jaxtune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command():
    out = jaxtune("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert f"\n    {name} " in out.stdout  # argparse's command list: name, then its one-line description


@pytest.mark.parametrize(
    "command, expected",
    [
        (["train"], ["CONFIG", "section.field=value", "--print-config"]),
        (["export"], ["--checkpoint", "--out", "--adapter", "--merge", "--config"]),
        (
            ["generate"],
            ["--model", "--adapter", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p"],
        ),
        (["chat"], ["--model", "--adapter", "--template", "--temperature"]),
        (["data"], ["inspect", "prepare"]),
        (["data", "inspect"], ["CONFIG", "section.field=value"]),
        (["data", "prepare"], ["CONFIG", "section.field=value"]),
        (["plot"], ["RUN_DIR", "--out"]),
        (["estimate"], ["CONFIG", "section.field=value"]),
    ],
)
def test_command_help(command, expected):
    out = jaxtune(*command, "--help")
    assert out.returncode == 0, out.stderr
    for word in expected:
        assert word in out.stdout


def test_help_shows_dataclass_defaults():
    out = jaxtune("generate", "--help").stdout
    assert f"(default: {GenerationConfig.max_new_tokens})" in out


def test_help_does_not_import_jax():
    code = textwrap.dedent("""
        import sys
        from jaxtune.cli import main
        try:
            main(["train", "--help"])
        except SystemExit:
            pass
        print("jax" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False"


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: jaxtune" in capsys.readouterr().err
    assert cli.main(["data"]) == 2
    assert "usage: jaxtune data" in capsys.readouterr().err


def test_config_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("training:\n  learnig_rate: 1.0e-4\n")
    out = jaxtune("train", "bad.yaml", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == (
        "jaxtune: error: unknown key 'training.learnig_rate' (bad.yaml, line 2); "
        "did you mean 'training.learning_rate'?\n"
    )


def test_print_config_resolves_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: /ckpt\n")
    assert cli.main(["train", str(path), "--print-config", "training.learning_rate=3e-4"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(path, ["training.learning_rate=3e-4"])


def test_missing_command_module_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.TARGETS, "plot", "jaxtune.no_such_module:main")
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "jaxtune: error: 'jaxtune plot' is not available: module jaxtune.no_such_module is not installed.\n"
    )


def test_broken_command_module_exits_2_with_the_cause(monkeypatch, tmp_path, capsys):
    (tmp_path / "jt_broken_target.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.TARGETS, "plot", "jt_broken_target:main")
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        "importing jt_broken_target failed (ModuleNotFoundError: No module named 'no_such_dependency_xyz')"
        in err
    )


@pytest.fixture
def fake_targets(monkeypatch, tmp_path):
    """Points every command at a module that records what it was called with."""
    (tmp_path / "jt_fake_target.py").write_text(
        textwrap.dedent("""
            calls = []
            def record(*args, **kwargs):
                calls.append((args, kwargs))
                return 0 if not calls[-1][0] or not hasattr(args[0], "training") else args[0].training.batch_size
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for command in cli.TARGETS:
        monkeypatch.setitem(cli.TARGETS, command, "jt_fake_target:record")
    import jt_fake_target

    jt_fake_target.calls.clear()
    return jt_fake_target.calls


@pytest.mark.parametrize("command", ["train", "estimate", "data inspect", "data prepare"])
def test_config_commands_get_the_run_config(fake_targets, tmp_path, command):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    code = cli.main([*command.split(), str(path), "training.batch_size=12", "seed=3"])
    assert code == 12  # an int returned by the command is the exit status
    (cfg, *rest), kwargs = fake_targets[0]
    assert isinstance(cfg, RunConfig) and kwargs == {}
    assert (cfg.training.batch_size, cfg.seed) == (12, 3)
    assert rest == (["lm"] if command.startswith("data") else [])  # the sft record's data kind


def test_overrides_may_follow_options(fake_targets, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    assert cli.main(["train", str(path), "--print-config", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out and fake_targets == []


def test_plot_export_generate_dispatch(fake_targets, tmp_path):
    assert cli.main(["plot", str(tmp_path), "--out", "x.png"]) == 0
    assert fake_targets[-1] == ((str(tmp_path),), {"out": "x.png"})
    assert cli.main(["export", "--checkpoint", "runs/a", "--out", "o", "--merge"]) == 0
    (args,), _ = fake_targets[-1]
    assert (args.checkpoint, args.out, args.merge, args.adapter) == ("runs/a", "o", True, False)
    assert cli.main(["generate", "--model", "m", "--prompt", "hi", "--top-k", "5", "--stop", "\n\n"]) == 0
    (args,), _ = fake_targets[-1]
    assert args.prompt == ["hi"]  # --prompt repeats: one completion each
    assert args.generation == GenerationConfig(top_k=5, stop=("\n\n",))


def test_invalid_sampling_flag_is_a_user_error(fake_targets, capsys):
    assert cli.main(["chat", "--model", "m", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err == "jaxtune: error: --top-p must be in (0, 1], got 1.5.\n"
    assert fake_targets == []


def test_export_adapter_and_merge_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--checkpoint", "a", "--out", "b", "--adapter", "--merge"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_user_errors_of_other_modules_print_without_traceback(monkeypatch, tmp_path, capsys):
    """Any `JaxtuneError`, wherever it is defined, prints as one line; a plain ValueError keeps its traceback."""
    (tmp_path / "jt_raising_target.py").write_text(
        "from jaxtune.errors import JaxtuneError\n\n"
        "class BadRows(JaxtuneError, ValueError):\n    pass\n\n"
        "def main(run_dir, out=None):\n    raise BadRows('data.json, row 3: missing field messages')\n\n"
        "def bug(run_dir, out=None):\n    raise ValueError('an internal invariant broke')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.TARGETS, "plot", "jt_raising_target:main")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "jaxtune: error: data.json, row 3: missing field messages\n"
    monkeypatch.setitem(cli.TARGETS, "plot", "jt_raising_target:bug")
    with pytest.raises(ValueError):  # not a JaxtuneError: a bug, so the traceback stays
        cli.main(["plot", str(tmp_path)])


def test_jaxtune_own_value_errors_are_one_line_and_traceback_on_request(tmp_path, monkeypatch, capsys):
    """A mesh bigger than the machine is raised by jaxtune's mesh code with a message for the user: one line,
    status 2. JAXTUNE_TRACEBACK=1 gives the traceback instead."""
    args = ["train", "configs/demo.yaml", "parallel.fsdp=64", f"output_dir={tmp_path}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: Cannot infer parallel.data=-1: the other sizes multiply to 64") and err.count("\n") == 1
    monkeypatch.setenv("JAXTUNE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="multiply to 64"):
        cli.main(args)


def test_epilog_examples_name_shipped_configs():
    root = Path(__file__).resolve().parents[1]
    shipped = re.findall(r"configs/[\w/]+\.yaml", cli.EPILOG)
    assert shipped and all((root / c).is_file() for c in shipped), shipped
