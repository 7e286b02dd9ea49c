"""Docs that cannot rot: the fenced blocks of the guides in docs/, run and checked.

A block is runnable when the line directly above its opening fence is ``<!-- docs-test: run -->`` or
``<!-- docs-test: run KEY=VALUE ... -->`` (``bash`` and ``python`` blocks only). All runnable blocks of one
guide run in order in one fresh working directory ``TMP/work`` holding a ``configs`` link to the repository's
``configs/``, beside ``TMP/shared``, a link to the repository's sibling ``shared/`` (so ``../shared/data/...``
reads as from the repository root); ``jaxtune`` on PATH is the CLI of the repository under test and the marker's
overrides are appended to each of its config commands (train, estimate, data inspect, data prepare), so a guide
shows the real command and the test runs it tiny. bash blocks run under ``bash -euo pipefail``, python blocks
with ``python``; a block passes when it exits 0.

Config keys: every ``section.field`` a guide writes in inline code or a non-python block (``training.learning_rate``,
``data.cutoff_len`` ...) and every key of a YAML block that reads as a run config must be a field of
`jaxtune.config.RunConfig`.

    python tests/docs_check.py docs/en/pipeline.md              # run a guide's blocks, print each one's time
    python tests/docs_check.py --keys docs/en/*.md docs/zh/*.md  # check the config keys only
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<verb>\S+)(?P<args>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
RUNNABLE = ("bash", "python")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
# a dotted key: not part of a longer dotted name (jaxtune.peft.prepare), a path (runs/x/data.json), a call's
# argument (f(model.config)) or a wildcard (parallel.dcn_*)
DOTTED = re.compile(r"(?<![\w./\-$(])([a-z_]+)\.([A-Za-z_]\w*)(?![\w(\-*])")
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "txt", "csv", "tsv", "parquet", "arrow", "py", "md", "png",
                 "log", "safetensors", "bin", "sh", "gz", "zip", "pt", "model", "index"}  # fmt: skip


class DocsError(Exception):
    """A guide that does not parse, names a missing config key, or whose runnable block fails."""


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    run: bool
    overrides: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file, with their markers."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        marker = MARKER.match(lines[i].strip())
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise DocsError(f"{path}:{i + 1}: a docs-test marker must be the line directly above a fenced block")
        if not m:
            i += 1
            continue
        start, fence, lang = i, m["fence"], m["lang"].lower()
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m["indent"]) :] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        if i == len(lines):
            raise DocsError(f"{path}:{start + 1}: the fenced block is never closed")
        i += 1
        above = MARKER.match(lines[start - 1].strip()) if start else None
        run, overrides = False, ()
        if above:
            if above["verb"] != "run":
                raise DocsError(f"{path}:{start}: unknown docs-test marker {above['verb']!r} (only 'run')")
            if lang not in RUNNABLE:
                raise DocsError(f"{path}:{start}: a {lang or 'plain'} block cannot be runnable (bash, python)")
            run, overrides = True, tuple(shlex.split(above["args"]))
            bad = [o for o in overrides if not re.fullmatch(r"[A-Za-z_][\w.]*=\S*", o)]
            if bad:
                raise DocsError(f"{path}:{start}: marker overrides must be section.field=value, not {bad}")
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", run, overrides))
    return out


# ------------------------------------------------------------------------------------------------ keys


def _schema() -> tuple[dict, dict]:
    """RunConfig's top-level fields -> type, and each section's name -> its dataclass."""
    from jaxtune.config import DataSource, RunConfig

    top = typing.get_type_hints(RunConfig)
    sections = {k: t for k, t in top.items() if dataclasses.is_dataclass(t)}
    for alias, name in RunConfig.ALIASES.items():
        sections[alias] = sections[name]
    sections["__source__"] = DataSource
    return top, sections


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _missing(where: str, key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted(known), n=1)
    hint = f" (did you mean {key.rsplit('.', 1)[0]}.{close[0]}?)" if "." in key and close else ""
    return f"{where}: config key {key} does not exist in jaxtune/config.py{hint}"


def dotted_keys(text: str) -> list[str]:
    """`section.field` names in a piece of text (file names such as data.json left out)."""
    _, sections = _schema()
    return [f"{s}.{f}" for s, f in DOTTED.findall(text)
            if s in sections and s != "__source__" and f not in FILE_SUFFIXES]  # fmt: skip


def _yaml_errors(where: str, text: str) -> list[str]:
    top, sections = _schema()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []  # not YAML (a shell transcript in a yaml fence ...): nothing to check
    if not isinstance(data, dict) or not any(k in sections for k in data):
        return []  # not a run config (dataset_info.json in YAML, a compose file ...)
    errors = []
    for key, value in data.items():
        if key not in top and key not in sections:
            errors.append(_missing(where, str(key), set(top)))
        elif key in sections and isinstance(value, dict):
            known = _fields(sections[key])
            for field, sub in value.items():
                if field not in known:
                    errors.append(_missing(where, f"{key}.{field}", known))
                elif key == "data" and field in ("train", "eval"):  # DataSource mappings
                    for item in sub if isinstance(sub, list) else [sub]:
                        src = _fields(sections["__source__"])
                        for k in item if isinstance(item, dict) else ():
                            if k not in src:
                                errors.append(_missing(where, f"data.{field}[].{k}", src))
    return errors


def key_errors(path: Path, text: str | None = None) -> list[str]:
    """Every config key `path` mentions that RunConfig lacks, as 'file:line: ...' messages."""
    _, sections = _schema()
    text = path.read_text(encoding="utf-8") if text is None else text
    errors = []
    fenced = {}
    for b in blocks(path, text):
        fenced.update({n: b for n in range(b.line, b.line + b.text.count("\n") + 1)})
        if b.lang in ("yaml", "yml"):
            errors += _yaml_errors(b.where, b.text)
        elif b.lang != "python":  # python blocks hold attribute chains (model.config), not config keys
            for n, line in enumerate(b.text.splitlines(), b.line + 1):
                errors += [_missing(f"{path}:{n}", k, _fields(sections[k.split('.')[0]]))
                           for k in dotted_keys(line) if k.split(".")[1] not in _fields(sections[k.split(".")[0]])]  # fmt: skip
    for n, line in enumerate(text.splitlines(), 1):
        if n in fenced:
            continue
        for _, code in INLINE.findall(line):
            for k in dotted_keys(code):
                section, field = k.split(".")
                if field not in _fields(sections[section]):
                    errors.append(_missing(f"{path}:{n}", k, _fields(sections[section])))
    return errors


# ------------------------------------------------------------------------------------------------ runs

WRAPPER = """\
#!{python}
# `jaxtune` for the docs test: the CLI of {root}, with the block's marker overrides appended to config commands
import os, sys
sys.path.insert(0, {root!r})
from jaxtune.cli import main
args = sys.argv[1:]
extra = os.environ.get("DOCS_TEST_OVERRIDES", "").split()
if extra and (args[:1] in (["train"], ["estimate"]) or args[:2] in (["data", "inspect"], ["data", "prepare"])):
    args += extra
sys.exit(main(args))
"""


def workspace(tmp: Path, root: Path = REPO) -> tuple[Path, dict]:
    """TMP/work (the blocks' working directory) and the environment they run in."""
    work, bin_dir = tmp / "work", tmp / "bin"
    work.mkdir(parents=True)
    bin_dir.mkdir()
    (work / "configs").symlink_to(root / "configs")
    if (root.parent / "shared").is_dir():
        (tmp / "shared").symlink_to(root.parent / "shared")
    wrapper = bin_dir / "jaxtune"
    wrapper.write_text(WRAPPER.format(python=sys.executable, root=str(root)))
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DOCS_TEST_OVERRIDES"}
    # the suite's compile flags pass on; a device count is the block's to set (scaling-out fakes 8 devices)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update({"XLA_FLAGS": " ".join(flags)} if flags else {})
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])]),
        JAXTUNE_DATA_CACHE=str(tmp / "data-cache"),
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
    )
    return work, env


def run_block(block: Block, work: Path, env: dict, timeout: float = 600) -> tuple[float, str]:
    """Run one block in `work`; (seconds, output). Raises DocsError with the output when it fails."""
    script = work.parent / f"block_{block.line}.{'sh' if block.lang == 'bash' else 'py'}"
    script.write_text(block.text, encoding="utf-8")
    cmd = ["bash", "-euo", "pipefail", str(script)] if block.lang == "bash" else [sys.executable, str(script)]
    env = {**env, "DOCS_TEST_OVERRIDES": " ".join(block.overrides)}
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DocsError(f"{block.where}: the {block.lang} block ran past {timeout:.0f} s\n{e.stdout or ''}") from None
    seconds, output = time.perf_counter() - start, p.stdout + p.stderr
    if p.returncode:
        tail = output[-4000:]
        raise DocsError(f"{block.where}: the {block.lang} block exited {p.returncode}"
                        f"{' (overrides: ' + ' '.join(block.overrides) + ')' if block.overrides else ''}\n{tail}")  # fmt: skip
    return seconds, output


def run_guide(path: Path, root: Path = REPO, verbose: bool = False) -> list[tuple[Block, float]]:
    """Run every runnable block of `path` in order, in one fresh working directory."""
    todo = [b for b in blocks(path) if b.run]
    timings = []
    with tempfile.TemporaryDirectory(prefix="jaxtune-docs-") as tmp:
        work, env = workspace(Path(tmp), root)
        for b in todo:
            seconds, output = run_block(b, work, env)
            timings.append((b, seconds))
            if verbose:
                print(f"--- {b.where} ({b.lang}, {seconds:.1f} s)\n{output}", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the runnable blocks of guides, or check their config keys")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--root", type=Path, default=REPO, help="repository whose jaxtune and configs/ run")
    parser.add_argument("--keys", action="store_true", help="check config keys only; run nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    failed = False
    for path in args.files:
        errors = key_errors(path)
        print("\n".join(errors) or f"{path}: config keys ok")
        failed |= bool(errors)
        if not args.keys:
            try:
                timings = run_guide(path, args.root.resolve(), verbose=True)
            except DocsError as e:
                print(f"FAILED {e}")
                failed = True
                continue
            total = sum(s for _, s in timings)
            print(f"{path}: {len(timings)} runnable blocks ok in {total:.1f} s "
                  f"({', '.join(f'line {b.line}: {s:.1f} s' for b, s in timings)})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
