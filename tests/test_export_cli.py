"""`jaxtune export` argument forms: RUN_DIR OUT, --out, --adapter DIR / --merge DIR, --checkpoint; every
`jaxtune export` example in the README, configs, launch scripts and docstrings is one the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from jaxtune import cli

REPO = Path(__file__).resolve().parents[1]
# `jaxtune export ...` in backticks, or a line (of a docstring, an epilog, a comment) starting with it
EXAMPLE = re.compile(r"`(jaxtune export [^`]*)`|^[\s#]*(jaxtune export [^#\n]*)", re.M)


@pytest.fixture
def exports(monkeypatch):
    """The calls `jaxtune export` makes to `jaxtune.export.export`: (source, out, mode, config)."""
    import jaxtune.export

    calls = []
    monkeypatch.setattr(jaxtune.export, "export", lambda *a: calls.append(a))
    return calls


@pytest.mark.parametrize(
    "argv, call",
    [
        (["runs/a", "out"], ("runs/a", "out", "auto", None)),
        (["runs/a", "out", "--merge"], ("runs/a", "out", "merge", None)),
        (["runs/a", "out", "--adapter"], ("runs/a", "out", "adapter", None)),
        (["runs/a", "--adapter", "out"], ("runs/a", "out", "adapter", None)),
        (["runs/a", "--out", "out", "--merge"], ("runs/a", "out", "merge", None)),
        (["runs/a", "out", "--out", "out/"], ("runs/a", "out", "auto", None)),  # the same directory twice
        (["--checkpoint", "runs/a", "out"], ("runs/a", "out", "auto", None)),
        (
            ["--checkpoint", "runs/a", "--out", "out", "--config", "c.yaml"],
            ("runs/a", "out", "auto", "c.yaml"),
        ),
    ],
)
def test_argument_forms(exports, argv, call):
    assert cli.main(["export", *argv]) == 0
    assert exports == [call]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["runs/a", "out", "--out", "other"], "two output directories (OUT out, --out other); give one"),
        (["runs/a", "out", "--merge", "other"], "two output directories (OUT out, --merge other)"),
        (["--checkpoint", "runs/a", "runs/b", "out"], "the run is given twice"),
        (["runs/a"], "give the output directory (OUT, --out DIR, --adapter DIR or --merge DIR)"),
        (["--out", "out"], "give the run directory"),
    ],
)
def test_conflicting_or_missing_arguments_are_one_line_errors(exports, capsys, argv, message):
    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error: jaxtune export: ") and message in err and err.count("\n") == 1
    assert exports == []


def _examples() -> list[str]:
    files = [
        REPO / "README.md",
        *sorted((REPO / "configs").rglob("*.yaml")),
        *sorted((REPO / "launch").rglob("*")),
    ]
    files += sorted((REPO / "jaxtune").rglob("*.py"))
    found = []
    for path in files:
        if path.is_file():
            for m in EXAMPLE.finditer(path.read_text(errors="replace")):
                found.append(f"{path.relative_to(REPO)}: {(m.group(1) or m.group(2)).strip()}")
    return found


def test_the_documented_examples_are_found():
    examples = "\n".join(_examples())
    assert "README.md: jaxtune export RUN_DIR --adapter OUT" in examples
    assert "jaxtune/export.py: jaxtune export runs/full out/model" in examples


@pytest.mark.parametrize("example", _examples())
def test_every_documented_example_parses(exports, example):
    argv = shlex.split(example.split(": ", 1)[1])
    assert cli.main(argv[1:]) == 0, example
    assert len(exports) == 1 and exports[0][1] is not None
