"""The `jaxtune` command: train | export | generate | chat | data inspect | data prepare | plot | estimate | board.

Each command names its implementation as a ``"module:function"`` string (`TARGETS`) imported only when the
command runs, so ``jaxtune --help`` answers at once and never imports JAX. Errors meant for users — every
`jaxtune.errors.JaxtuneError` (config, data, checkpoint, model directory, mesh ...), and a command whose module
cannot be imported — print one ``jaxtune: error: ...`` paragraph and exit with status 2, without a traceback;
anything else is a bug and keeps its traceback. `JAXTUNE_TRACEBACK=1` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxtune.config import ConfigError, GenerationConfig, dump_yaml, load_config
from jaxtune.errors import JaxtuneError
from jaxtune.typed_yaml import Invalid

TARGETS = {
    "train": "jaxtune.train.loop:run",  # run(cfg: RunConfig)
    "export": "jaxtune.export:main",  # main(args)
    "generate": "jaxtune.generate_cli:main",  # main(args); args.generation is a GenerationConfig
    "chat": "jaxtune.generate_cli:main",
    "data inspect": "jaxtune.data.inspect:main",  # main(cfg, data kind of the stage)
    "data prepare": "jaxtune.data.prepare_cmd:main",  # main(cfg, data kind of the stage)
    "plot": "jaxtune.train.plot:main",  # main(run_dir, out=None)
    "estimate": "jaxtune.estimate:main",  # main(cfg)
    "board": "jaxtune.board.server:main",  # main(args)
}
# take CONFIG [overrides...] and get a RunConfig
CONFIG_COMMANDS = ("train", "data inspect", "data prepare", "estimate")

EPILOG = """\
examples:
  jaxtune train configs/demo.yaml
  jaxtune train configs/sft/llama3_lora.yaml training.learning_rate=1e-4 data.train=[a.json,b.json]
  jaxtune train configs/demo.yaml --print-config     # check a config without running it
  jaxtune export --checkpoint runs/demo --out exported --merge
  jaxtune chat --model exported
"""


TRAIN_EPILOG = """\
exit status:
  0    the run finished (max_steps / num_epochs reached, or early stopping)
  2    an error in the config, data, checkpoints ... (one 'jaxtune: error:' paragraph)
  143  stopped by SIGTERM (preemption), 130 by SIGINT (Ctrl-C): 128 + the signal's number, as for a process the
       signal killed. A checkpoint of the last step was saved: rerun the same command to resume (training.resume
       = auto). A wrapper that restarts failed runs restarts it (launch/tpu.sh --restarts does on 143; a
       Kubernetes Job with restartPolicy OnFailure; SLURM marks it FAILED, not COMPLETED).
"""


BOARD_EPILOG = """\
needs the board extra: pip install -e ".[board]"
examples:
  jaxtune board                                  # http://localhost:7860/, this machine only
  jaxtune board --host 0.0.0.0 --port 8080       # reachable from others: prints a URL with a token
Runs started from the page are `jaxtune train` processes of their own: closing the page or stopping the board
leaves them running; Stop sends SIGTERM (they checkpoint and exit 143), Resume reruns the same command.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", metavar="CONFIG", help="YAML run config (holds only the differences from defaults)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.field=value",
        help="override any config field, e.g. training.learning_rate=1e-4 or method.target_modules=[q_proj,v_proj]",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; None means "GenerationConfig's default", which the help shows."""
    d = GenerationConfig()
    p.add_argument(
        "--model", metavar="DIR", required=True,
        help="Hugging Face model directory, or a jaxtune run directory (uses its hf/ or adapter/ export)",
    )  # fmt: skip
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory applied on top of --model")
    p.add_argument("--template", metavar="NAME", help="chat template name (default: the tokenizer's own)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help=f"tokens to generate (default: {d.max_new_tokens})"
    )
    p.add_argument("--temperature", type=float, metavar="T", help=f"0 = greedy (default: {d.temperature})")
    p.add_argument("--top-k", type=int, metavar="K", help=f"0 = off (default: {d.top_k})")
    p.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling mass (default: {d.top_p})")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string; repeat for several")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtune", formatter_class=_Formatter, epilog=EPILOG,
        description="Fine-tune open LLMs in JAX/Flax: SFT, PEFT, DPO, RLHF, from one GPU to TPU pods.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.set_defaults(print_help=parser.print_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        return parent.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Formatter
        )

    p = command("train", "fine-tune a model as a YAML config (and overrides) describes")
    p.epilog = TRAIN_EPILOG
    _add_config_args(p)

    p = command("export", "write a checkpoint as a Hugging Face model or a PEFT adapter")
    p.add_argument(
        "run", nargs="?", metavar="RUN_DIR", help="run directory (latest step) or its checkpoints/<step>"
    )
    p.add_argument(
        "out_dir", nargs="?", metavar="OUT", help="output directory (or --out, --adapter DIR, --merge DIR)"
    )
    p.add_argument(
        "--checkpoint", metavar="RUN_DIR_OR_STEP", help="the same as RUN_DIR (then OUT may follow alone)"
    )
    p.add_argument("--out", metavar="DIR", help="output directory, the same as OUT")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--adapter", nargs="?", const=True, default=False, metavar="DIR",
        help="write only the adapter, in PEFT-library format (default without a flag: adapter methods -> adapter; "
        "full / freeze -> HF model; BitFit -> HF model when the checkpoint has those biases (GPT-2), else its "
        "adapter, which --merge folds into an HF model with attention_bias / mlp_bias on)",
    )  # fmt: skip
    kind.add_argument(
        "--merge", nargs="?", const=True, default=False, metavar="DIR",
        help="merge adapters into the base weights; write a full HF model",
    )  # fmt: skip
    p.add_argument("--config", metavar="CONFIG", help="run config, when the run directory has none")

    p = command("generate", "complete a prompt with a model (and optional adapter)")
    _add_sampling_args(p)
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="prompt text; repeat for several (default: stdin)"
    )
    p.add_argument("--file", metavar="FILE", help="prompts: one per line, or a .json/.jsonl/.csv dataset")
    p.add_argument("--raw", action="store_true", help="use the prompt text as is, without the chat template")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per batch (default: 16)")
    _add_sampling_args(command("chat", "chat with a model in the terminal"))

    p = command("data", "dataset tools: data inspect CONFIG, data prepare CONFIG")
    p.set_defaults(print_help=p.print_help)
    data = p.add_subparsers(dest="data_command", metavar="COMMAND", title="commands")
    _add_config_args(
        command("inspect", "show how a config's data is read, templated, tokenised and batched", data)
    )
    _add_config_args(
        command("prepare", "tokenise a config's data once into the memory-mapped cache that runs map", data)
    )

    p = command("plot", "plot the loss and metric curves of a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holding metrics.jsonl)")
    p.add_argument("--out", metavar="FILE", help="image path (default: inside RUN_DIR)")

    _add_config_args(command("estimate", "estimate parameter, optimiser and activation memory for a config"))

    p = command("board", "serve a local web page to configure, launch, watch and compare runs, and chat")
    p.epilog = BOARD_EPILOG
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="directory of run directories (default: runs)")
    p.add_argument(
        "--token", metavar="TOKEN",
        help="every request must carry it (?token=, cookie, or Authorization: Bearer); a non-local --host "
        "without one gets a random token, printed with the URL",
    )  # fmt: skip
    p.add_argument("--config", metavar="CONFIG", help="YAML config the form starts from (default: configs/demo.yaml)")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxtune")
    except Exception:  # not installed (running from a checkout)
        return "(not installed)"


class _Unavailable(Exception):
    """A command whose implementation cannot be imported."""


def _target(command: str) -> Callable[..., Any]:
    spec = TARGETS[command]
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if isinstance(e, ModuleNotFoundError) and (module == missing or module.startswith(missing + ".")):
            raise _Unavailable(
                f"'jaxtune {command}' is not available: module {module} is not installed."
            ) from None
        raise _Unavailable(
            f"'jaxtune {command}' is not available: importing {module} failed ({type(e).__name__}: {e}). "
            "A dependency may be missing; `pip install -e .` installs them."
        ) from None
    if not callable(fn):
        raise _Unavailable(f"'jaxtune {command}' is not available: {module} defines no function '{name}'.")
    return fn


def _is_user_error(e: Exception) -> bool:
    if os.environ.get("JAXTUNE_TRACEBACK"):  # JAXTUNE_TRACEBACK=1: every error with its traceback
        return False
    return isinstance(e, (JaxtuneError, _Unavailable))


def _run(args: argparse.Namespace, command: str) -> Any:
    if command in CONFIG_COMMANDS:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        if command in ("data inspect", "data prepare"):  # the data kind comes from the stage's method record
            from jaxtune.methods import METHODS

            return _target(command)(cfg, METHODS[cfg.stage].data_kind)
        return _target(command)(cfg)
    if command == "plot":
        return _target(command)(args.run_dir, out=args.out)
    if command == "board":
        return _target(command)(args)
    if command in ("generate", "chat"):
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)}
        given = {k: tuple(v) if k == "stop" else v for k, v in given.items() if v is not None}
        try:
            args.generation = GenerationConfig(**given)
        except Invalid as e:
            raise ConfigError(f"--{e.field.replace('_', '-')} {e.detail}.") from None
    return _target(command)(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = "data " + (args.data_command or "") if args.command == "data" else args.command
    if command in CONFIG_COMMANDS:  # overrides may follow options: train x.yaml --print-config a.b=1
        args.overrides += [a for a in extra if re.fullmatch(r"[A-Za-z_][\w.]*=.*", a, re.S)]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    show_help = vars(args).pop("print_help")
    if command not in TARGETS:  # no command, or `jaxtune data` alone
        show_help(sys.stderr)
        return 2
    try:
        result = _run(args, command)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"jaxtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxtune: interrupted", file=sys.stderr)
        return 130
    if command == "train" and isinstance(result, dict):
        return stop_status(result)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def stop_status(summary: dict) -> int:
    """`jaxtune train`'s exit status: 0 for a finished run, 128 + N for one a signal N stopped (after its
    checkpoint), so launchers and schedulers see "killed by a signal" and restart it."""
    reason = str(summary.get("stop_reason", ""))
    if reason.startswith("signal "):
        return 128 + signal.Signals[reason.removeprefix("signal ")].value
    return 0
