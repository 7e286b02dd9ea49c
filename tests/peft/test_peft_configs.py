"""The README's "PEFT methods" table and the shipped configs agree: every method has a row, every row names a
config (plus overrides) that exists, loads and selects that method, and every PEFT config under configs/sft/ is
in the table. Each of those configs also trains 2 steps on a tiny model of its family in tests/test_configs.py,
which runs every shipped YAML."""

import re
from pathlib import Path

import pytest

from jaxtune import peft
from jaxtune.config import load_config

REPO = Path(__file__).resolve().parents[2]
# rows whose first cell is a variant rather than a method name: what their config must switch on
VARIANTS = {
    "rsLoRA": lambda m: m.rslora,
    "LoRA+": lambda m: m.loraplus_lr_ratio is not None,
    "PiSSA": lambda m: m.pissa,
    "MoE experts": lambda m: (
        m.name == "lora" and (m.target_modules == "all-linear" or bool(m.target_parameters))
    ),
    "`adapter` Houlsby": lambda m: m.name == "adapter" and m.adapter_type == "houlsby",
    "`adapter` Pfeiffer": lambda m: m.name == "adapter" and m.adapter_type == "pfeiffer",
    "combination": lambda m: len(m.combine) > 0,
}


def table_rows() -> list[tuple[str, str, list[str]]]:
    """(first cell, config path, overrides) per row of the README's PEFT table."""
    text = (REPO / "README.md").read_text()
    section = text.split("## PEFT methods", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] in ("method", "---"):
            continue
        words = re.sub(r"[`()]", "", cells[-1]).split()
        rows.append((cells[0], f"configs/sft/{words[0]}", [w for w in words[1:] if "=" in w]))
    return rows


def test_every_method_has_a_row():
    named = {
        re.fullmatch(r"`(\w+)`.*", first).group(1) for first, _, _ in table_rows() if first.startswith("`")
    }
    assert named == set(peft.METHODS), sorted(set(peft.METHODS) ^ named)


@pytest.mark.parametrize("first, path, overrides", table_rows())
def test_row_config_selects_its_method(first, path, overrides):
    method = load_config(REPO / path, overrides).method
    if first in VARIANTS:
        assert VARIANTS[first](method), (first, path, overrides)
    else:
        name = re.fullmatch(r"`(\w+)`", first).group(1)
        assert name == method.name or name in method.combine, (first, path, method.name)


def test_every_peft_config_is_in_the_table():
    listed = {path for _, path, _ in table_rows()}
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "sft").glob("*.yaml")}
    peft_configs = {p for p in shipped if load_config(REPO / p).method.name != "full"}
    assert peft_configs <= listed, sorted(peft_configs - listed)
