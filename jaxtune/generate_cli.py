"""`jaxtune generate` and `jaxtune chat`: KV-cache decoding (jaxtune/generate.py) from the command line.

    jaxtune generate --model runs/demo --prompt "Reverse the word.\nabcde" --temperature 0
    jaxtune generate --model hf_dir --adapter adapter_dir --file prompts.txt --jsonl
    jaxtune chat --model runs/demo            # one user turn per line; /reset clears, /exit or EOF quits

`--model` is a Hugging Face model directory or a jaxtune run directory (its `hf/` export, or its base model
plus its `adapter/` export, with the run's tokenizer). Prompts go through the chat template (the
tokenizer's own, or `--template NAME`) unless `--raw`; `--file` takes one prompt per line, rows of `--jsonl`
output (`{"prompt": ...}`), or a dataset file (.json/.jsonl/.csv/.parquet) whose records are read like training
data (a final assistant turn is dropped).
Generation stops at the EOS token(s) of the tokenizer and config, at single-token `--stop` strings inside
the jitted loop, and at any `--stop` string in the decoded text.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtune.errors import JaxtuneError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
CHAT_HELP = "jaxtune chat: type a message and press Enter; /reset clears the history, /exit or Ctrl-D quits."


class GenerateError(JaxtuneError, ValueError):
    """A user error in `jaxtune generate` / `chat` arguments (printed without a traceback)."""


@dataclass
class Loaded:
    arch: Any
    variables: dict
    tokenizer: Any
    stop_ids: tuple[int, ...]


def _eos_ids(tokenizer, hf_config: dict) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), hf_config.get("eos_token_id")):
        ids |= set(value) if isinstance(value, list | tuple) else ({value} if value is not None else set())
    return {int(i) for i in ids}


def load(model_dir: str, adapter_dir: str | None = None) -> Loaded:
    """A HF directory or a jaxtune run directory (+ optional PEFT adapter) -> what decoding needs."""
    from jaxtune import peft
    from jaxtune.models import hf
    from jaxtune.models.model import with_peft

    path = Path(model_dir)
    if (path / "config.yaml").exists() and not (path / "config.json").exists():
        if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
            if adapter_dir:
                raise GenerateError(
                    f"--adapter applies to a Hugging Face model directory; --model {model_dir} is a run, whose "
                    "own checkpoint is used"
                )
            return _from_checkpoint(path)
        model, run_adapter = _from_export(path)
        adapter_dir = adapter_dir or run_adapter
    elif (path / "config.json").exists():
        model = hf.load_model(path)
    else:
        raise GenerateError(
            f"--model {model_dir}: neither a Hugging Face model directory (config.json) nor a jaxtune run "
            "directory (config.yaml)"
        )
    if model.tokenizer is None:
        raise GenerateError(
            f"--model {model_dir}: no tokenizer files there; save the tokenizer beside the model"
        )
    arch, variables = model.arch, {"params": model.params}
    if adapter_dir:
        adapters = peft.load_adapter(model, adapter_dir)
        arch, variables = with_peft(arch, adapters.spec), {**variables, **adapters.variables}
    return Loaded(arch, variables, model.tokenizer, tuple(sorted(_eos_ids(model.tokenizer, model.hf_config))))


def _from_checkpoint(run_dir: Path) -> Loaded:
    """A run directory's latest checkpoint: the run rebuilt abstractly (train/run.py), its trained tree restored
    and merged with the base weights it adapts: exactly the policy training evaluated."""
    from jaxtune.peft import merge_variables
    from jaxtune.train.run import load_run

    run, step = load_run(run_dir)
    model = run.model
    logging.getLogger("jaxtune").info("generating with %s, checkpoint step %d", run_dir, step)
    variables = merge_variables(run.frozen, run.policy_trainable)
    arch = run.lm.arch.replace(neftune_alpha=0.0)
    return Loaded(arch, variables, model.tokenizer, tuple(sorted(_eos_ids(model.tokenizer, model.hf_config))))


def _from_export(run_dir: Path):
    """A run without checkpoints but with an export: `hf/` (full / BitFit / freeze-tuning) or the base model
    and `adapter/` (PEFT)."""
    from jaxtune.config import load_config
    from jaxtune.models import hf
    from jaxtune.train import setup

    cfg = load_config(run_dir / "config.yaml")
    if (run_dir / "hf" / "config.json").exists():
        model = hf.load_model(run_dir / "hf")
        if cfg.model.tokenizer == "builtin:chars" or model.tokenizer is None:
            model.tokenizer = setup.load_tokenizer(cfg) or model.tokenizer
        return model, None
    if (run_dir / "adapter").is_dir():
        return setup.build_model(cfg), str(run_dir / "adapter")
    raise GenerateError(
        f"--model {run_dir}: this run directory holds no checkpoint and no export (hf/ or adapter/); train it "
        "first, or pass a Hugging Face model directory"
    )


def encode(tokenizer, messages: list, system: str | None, template: str | None, raw: bool) -> list[int]:
    """Chat messages (role, content) -> prompt ids with the generation prompt; `raw`: the last text as is."""
    from jaxtune.data.records import Conversation, Message
    from jaxtune.data.tokenize import encode_prompt

    if raw:
        return list(tokenizer(messages[-1][1], add_special_tokens=True)["input_ids"])
    record = Conversation(tuple(Message(role, text) for role, text in messages), system=system)
    try:
        return encode_prompt(record, tokenizer, template).tolist()
    except ValueError as e:
        raise GenerateError(f"{e} (or pass --raw to use the prompt text without a chat template)") from None


GENERATED_KEYS = ("prompt", "completion", "answer")  # the keys of a `--jsonl` row
PROMPT_FILES = (
    "a prompt file is text with one prompt per line, or a .json/.jsonl/.csv/.parquet file of rows with a "
    "'prompt' (optionally 'completion' and 'answer', as --jsonl writes them), of chat 'messages' or "
    "'conversations', or of 'instruction' (+ 'input') columns; or give prompts with --prompt TEXT"
)


def read_prompts(args) -> list[tuple[list, str | None]]:
    """(messages, reference answer) per prompt, from --prompt, --file, or stdin."""
    prompts: list[tuple[list, str | None]] = [([("user", p)], None) for p in (args.prompt or [])]
    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise GenerateError(f"--file {args.file}: no such file")
        if path.suffix in DATA_SUFFIXES:
            prompts += _generated_rows(path) or _dataset_prompts(path)
        else:
            prompts += [([("user", line)], None) for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        text = sys.stdin.read()
        if not text.strip():
            raise GenerateError("no prompt: give --prompt TEXT, --file FILE, or text on stdin")
        prompts.append(([("user", text.rstrip("\n"))], None))
    return prompts


def _is_generated(row: dict) -> bool:
    """A row shaped like `--jsonl` output: a text 'prompt', and at most a 'completion' and an 'answer'."""
    extra_ok = all(isinstance(row[k], str | None) for k in GENERATED_KEYS[1:] if k in row)
    return isinstance(row.get("prompt"), str) and set(row) <= set(GENERATED_KEYS) and extra_ok


def _generated_rows(path: Path) -> list[tuple[list, str | None]] | None:
    """The prompts of a file whose every row is shaped like `--jsonl` output, else None. The reference answer
    is the row's 'answer', else its 'completion' (as in a prompt/completion dataset)."""
    from jaxtune.data.files import read_rows

    rows = [r.data for r in read_rows(path)]
    if not rows or not all(_is_generated(r) for r in rows):
        return None
    return [([("user", r["prompt"])], r.get("answer", r.get("completion"))) for r in rows]


def _dataset_prompts(path: Path) -> list[tuple[list, str | None]]:
    """The prompts of a dataset file read like training data (a final assistant turn is the answer)."""
    from jaxtune.data import load as load_records
    from jaxtune.data.errors import DataError
    from jaxtune.data.prepare import as_prompt
    from jaxtune.data.records import Conversation

    try:
        records = load_records(str(path))
    except DataError as e:
        if e.reason != "unknown format":
            raise
        detail = e.message.split("; name the format")[0]  # the data layer's advice names config options
        raise GenerateError(f"--file {path}, row {e.row}: {detail}; {PROMPT_FILES}") from None
    prompts = []
    for r in records:
        if not isinstance(r, Conversation):
            raise GenerateError(
                f"--file {path}, row {r.row}: a {type(r).__name__} record is no prompt; {PROMPT_FILES}"
            )
        r = as_prompt(r)
        prompts.append(([(m.role, m.content) for m in r.messages], r.answer))
    return prompts


def stop_token_ids(loaded: Loaded, stops) -> tuple[int, ...]:
    """The EOS ids, plus the stop strings that are one token: those can also end the jitted loop."""
    single = set()
    for s in stops:
        ids = loaded.tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            single.add(int(ids[0]))
    return tuple(sorted(set(loaded.stop_ids) | single))


class Generator:
    """Prompt ids -> completion texts with the sampling settings of `args.generation` (a GenerationConfig)."""

    def __init__(self, loaded: Loaded, gen, seed: int = 0):
        self.m, self.gen, self.seed = loaded, gen, seed
        self.stop_ids = stop_token_ids(loaded, gen.stop)

    def __call__(self, prompts: list[list[int]]) -> list[str]:
        from jaxtune.generate import cut_at_stop, generate

        g = self.gen
        outs = generate(self.m.arch, self.m.variables, prompts, max_new_tokens=g.max_new_tokens,
                        stop_ids=self.stop_ids, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                        seed=self.seed, pad_multiple=32)  # fmt: skip
        self.seed += 1  # the next call draws fresh samples
        texts = [self.m.tokenizer.decode(ids, skip_special_tokens=True) for ids in outs]
        return [cut_at_stop(t, g.stop)[0] for t in texts]


def run_generate(args, loaded: Loaded, out=None) -> list[str]:
    out = out or sys.stdout
    prompts = read_prompts(args)
    gen = Generator(loaded, args.generation, args.seed)
    ids = [encode(loaded.tokenizer, msgs, args.system, args.template, args.raw) for msgs, _ in prompts]
    texts: list[str] = []
    for start in range(0, len(ids), args.batch_size):
        texts += gen(ids[start : start + args.batch_size])
    for i, ((msgs, answer), text) in enumerate(zip(prompts, texts)):
        if args.jsonl:
            row = {"prompt": msgs[-1][1], "completion": text}
            if answer is not None:
                row["answer"] = answer
            print(json.dumps(row, ensure_ascii=False), file=out)
        else:
            if i:
                print("---", file=out)  # between completions, which may span lines
            print(text, file=out)
    return texts


def run_chat(args, loaded: Loaded, inp=None, out=None) -> int:
    inp, out = inp or sys.stdin, out or sys.stdout
    gen = Generator(loaded, args.generation, args.seed)
    interactive = inp.isatty()
    print(CHAT_HELP, file=sys.stderr)
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            print("> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append(("user", text))
        reply = gen([encode(loaded.tokenizer, history, args.system, args.template, raw=False)])[0]
        history.append(("assistant", reply))
        print(reply, file=out, flush=True)
    return 0


def main(args) -> int:
    """Entry point of both commands (`args.command` says which; `args.generation` holds the sampling)."""
    for name, default in (("seed", 0), ("raw", False), ("file", None), ("jsonl", False), ("batch_size", 16)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if getattr(args, "prompt", None) is not None and isinstance(args.prompt, str):
        args.prompt = [args.prompt]
    logging.getLogger("jax").setLevel(logging.WARNING)
    loaded = load(args.model, args.adapter)
    if args.command == "chat":
        return run_chat(args, loaded)
    run_generate(args, loaded)
    return 0
