"""The guides in docs/ (English and Chinese) and the two READMEs: every runnable block runs, every config key they
name exists, the Chinese guides run the same blocks as the English ones, and the memory table is what
`jaxtune estimate` says (tests/docs_check.py holds the machinery; docs/memory_table.py writes the table)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import docs_check
import pytest
from docs_check import DocsError, blocks, key_errors

REPO = docs_check.REPO
GUIDES = ("choosing-a-method", "pipeline", "vertical-domain", "your-data", "hyperparameters", "scaling-out")
LANGS = ("en", "zh")
READMES = {"en": REPO / "README.md", "zh": REPO / "README.zh-CN.md"}


def guide(lang: str, name: str) -> Path:
    return REPO / "docs" / lang / f"{name}.md"


def all_docs() -> list[Path]:
    return [guide(lang, name) for lang in LANGS for name in GUIDES] + [REPO / "docs" / lang / "README.md" for lang in LANGS]


def memory_table():
    spec = importlib.util.spec_from_file_location("memory_table", REPO / "docs" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- the documents


def test_every_guide_exists_in_both_languages_and_ends_in_a_runnable_block():
    for path in all_docs():
        assert path.is_file(), f"{path} is missing"
    for lang in LANGS:
        for name in GUIDES:
            found = blocks(guide(lang, name))
            assert found and found[-1].run, f"{guide(lang, name)}: the last block must be runnable"


def test_chinese_guides_run_the_same_blocks_as_english():
    for name in GUIDES:
        en = [(b.lang, b.text, b.overrides) for b in blocks(guide("en", name)) if b.run]
        zh = [(b.lang, b.text, b.overrides) for b in blocks(guide("zh", name)) if b.run]
        assert zh == en, f"docs/zh/{name}.md: runnable blocks differ from docs/en/{name}.md's"


def test_indexes_and_readmes_link_every_guide_and_each_other():
    for lang in LANGS:
        index = (REPO / "docs" / lang / "README.md").read_text(encoding="utf-8")
        readme = READMES[lang].read_text(encoding="utf-8")
        for name in GUIDES:
            assert f"({name}.md)" in index, f"docs/{lang}/README.md does not link {name}.md"
            assert f"(docs/{lang}/{name}.md)" in readme, f"{READMES[lang].name} does not link docs/{lang}/{name}.md"
    assert "(README.zh-CN.md)" in READMES["en"].read_text(encoding="utf-8")
    assert "(README.md)" in READMES["zh"].read_text(encoding="utf-8")


def test_chinese_readme_keeps_the_two_set_up_commands():
    def setup_commands(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        return [b.text for b in blocks(path) if b.lang == "bash"][:2] if text else []

    en, zh = setup_commands(READMES["en"]), setup_commands(READMES["zh"])
    assert en == ["pip install -e . && jaxtune train configs/demo.yaml\n",
                  'pip install -e ".[test]" && python -m pytest -q\n']  # fmt: skip
    assert zh == en


def test_relative_links_resolve():
    for path in [*all_docs(), *READMES.values()]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path}: link to {target} does not resolve"


def test_every_config_key_the_guides_name_exists():
    errors = [e for path in [*all_docs(), READMES["zh"]] for e in key_errors(path)]
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------------------------- the checker itself


def test_a_renamed_key_is_caught_in_prose_yaml_and_commands(tmp_path):
    text = guide("en", "hyperparameters").read_text(encoding="utf-8")
    assert "training.learning_rate" in text
    renamed = text.replace("training.learning_rate", "training.peak_lr")
    errors = key_errors(tmp_path / "g.md", renamed)
    assert errors and all("training.peak_lr" in e for e in errors)
    assert "did you mean" not in errors[0] or "training." in errors[0]
    md = """\
`method.rnak` and `data.json` and `jaxtune.peft.prepare`

```yaml
stage: sft
training: {learning_rat: 1.0e-4}
data:
  train: [{path: a.json, ration: 0.5}]
```

```bash
jaxtune train x.yaml model.dtyp=bfloat16 runs/x/data.json
```

```python
model.params  # python: attributes, not keys
```
"""
    errors = key_errors(tmp_path / "g.md", md)
    assert [e.split(": config key ")[1].split()[0] for e in errors] == [
        "training.learning_rat", "data.train[].ration", "model.dtyp", "method.rnak"
    ]  # fmt: skip
    assert "did you mean method.rank?" in errors[-1] and "g.md:1:" in errors[-1]


def test_markers_parse_and_misplaced_ones_are_errors(tmp_path):
    md = "<!-- docs-test: run training.max_steps=2 data.cutoff_len=32 -->\n```bash\necho hi\n```\n\n```python\nx = 1\n```\n"
    found = blocks(tmp_path / "g.md", md)
    assert [(b.lang, b.run, b.overrides, b.line) for b in found] == [
        ("bash", True, ("training.max_steps=2", "data.cutoff_len=32"), 2), ("python", False, (), 6)
    ]  # fmt: skip
    for bad, says in [
        ("<!-- docs-test: run -->\n\n```bash\nx\n```\n", "directly above"),
        ("<!-- docs-test: run -->\n```yaml\nx: 1\n```\n", "cannot be runnable"),
        ("<!-- docs-test: skip -->\n```bash\nx\n```\n", "unknown docs-test marker"),
        ("<!-- docs-test: run lr -->\n```bash\nx\n```\n", "section.field=value"),
        ("```bash\nnever closed\n", "never closed"),
    ]:
        with pytest.raises(DocsError, match=says):
            blocks(tmp_path / "g.md", bad)


def test_a_broken_command_fails_with_its_block_and_output(tmp_path):
    path = tmp_path / "g.md"
    path.write_text(
        "<!-- docs-test: run training.max_steps=1 -->\n```bash\necho made > made.txt\n"
        "jaxtune train configs/demo.yaml --print-config\n```\n\n"
        "<!-- docs-test: run -->\n```python\nfrom pathlib import Path\nassert Path('made.txt').read_text() == 'made\\n'\n```\n\n"
        "<!-- docs-test: run training.no_such_key=1 -->\n```bash\njaxtune train configs/demo.yaml --print-config\n```\n",
        encoding="utf-8",
    )  # fmt: skip
    with pytest.raises(DocsError) as e:
        docs_check.run_guide(path)
    message = str(e.value)
    assert f"{path}:14: the bash block exited 2 (overrides: training.no_such_key=1)" in message
    assert "no_such_key" in message.split("\n", 1)[1]  # jaxtune's own error, from the block's output


# ------------------------------------------------------------------------------------- the runs


@pytest.mark.parametrize("name", GUIDES)
def test_guide_blocks_run(name):
    timings = docs_check.run_guide(guide("en", name))
    assert timings, f"docs/en/{name}.md has no runnable block"


# ------------------------------------------------------------------------------------- the memory table


def test_memory_table_is_what_the_script_writes_now():
    mt = memory_table()
    table = mt.rows()
    for lang, path in mt.GUIDES.items():
        text = path.read_text(encoding="utf-8")
        assert mt.splice(text, mt.render(lang, table), path) == text, (
            f"{path}: the memory table is stale; run `python docs/memory_table.py`"
        )


def test_memory_table_row_matches_the_estimate_command(tmp_path):
    """One row of each method, from `jaxtune estimate` itself: the printed figures are the table's cells."""
    mt = memory_table()
    text = guide("en", "choosing-a-method").read_text(encoding="utf-8")
    for shape, method, remat in [("7B", "QLoRA NF4 r16", "full"), ("70B", "full, bf16 weights", "none")]:
        (tmp_path / "shape.yaml").write_text(mt.shape_yaml(shape))
        cmd = [sys.executable, "-m", "jaxtune", *mt.command(shape, method, remat)[1:]]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        printed = {k.strip(): float(v) for k, v in re.findall(r"^\s+([a-z /()0-9]+?)\s+([\d.]+) GB", p.stdout, re.M)}
        trainable = int(re.search(r"method [\w+]+: ([\d,]+) trainable", p.stdout)[1].replace(",", ""))
        row = next(line for line in text.splitlines() if line.startswith(f"| {shape} (") and f"| {method} |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        weights = printed["frozen weights"] + printed["trainable weights"]
        state = printed["gradients (fp32)"] + printed["optimizer (adamw)"]
        total = cells[6] if remat == "none" else cells[7]
        activations = cells[5].split(" / ")[mt.REMATS.index(remat)]
        # the command prints GB to 0.01 and the table to 0.1: equal within both roundings (sums: twice)
        for cell, value, rounding in [(cells[3], weights, 0.01), (cells[4], state, 0.01),
                                      (activations, printed["activations / device"], 0.005),
                                      (total, printed["total / device"], 0.005)]:  # fmt: skip
            assert abs(float(cell) - value) <= 0.05 + rounding + 1e-9, (row, p.stdout)
        assert cells[2].startswith(f"{trainable / 1e9:.2f} B" if trainable >= 1e9 else f"{trainable / 1e6:.1f} M")
