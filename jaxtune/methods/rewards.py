"""Reward functions for PPO and GRPO: rule-based, verifiable rewards selectable by name, or a Python hook.

A reward function takes the decoded completions of a rollout with their prompts and reference answers and
returns one float per completion (TRL's reward-function convention: lists in, list out):

    def my_reward(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]

Config names (`grpo.reward_fns`, `ppo.reward_fn`) are a builtin below or `"module:function"` importable from
the working directory or sys.path; several GRPO reward functions are summed. Builtins:

  exact_match     1 if the completion equals the reference answer (surrounding whitespace ignored), else 0
  answer_match    1 if the *final answer* equals the reference (numbers compared as numbers): the text in the
                  last <answer>...</answer>, else the last \\boxed{...}, else after the last "####" (GSM8K),
                  else the whole completion; 0 otherwise
  char_match      fraction of the reference's characters reproduced at their position, divided by the longer
                  of the two lengths (1 only for an exact match): partial credit for string tasks
  format_answer   1 if the completion is "<think>...</think><answer>...</answer>" (DeepSeek-R1's format reward,
                  TRL's `think_format_reward` family), else 0
  single_line     1 if the completion is non-empty and has no line break, else 0
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from jaxtune.errors import RunError

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], Sequence[float]]


def _need_answers(name: str, answers) -> None:
    missing = sum(a is None for a in answers)
    if missing:
        raise RunError(
            f"reward '{name}' compares with a reference answer, but {missing} of {len(answers)} prompts have none: "
            "give the data an `answer` column (or a final assistant turn), or use a reward that needs none"
        )  # fmt: skip


def exact_match(prompts, completions, answers) -> list[float]:
    _need_answers("exact_match", answers)
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers)]


def _final_answer(text: str) -> str:
    if m := re.findall(r"<answer>(.*?)</answer>", text, re.S):
        return m[-1].strip()
    if m := re.findall(r"\\boxed\{([^{}]*)\}", text):
        return m[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def _same(a: str, b: str) -> bool:
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return a == b


def answer_match(prompts, completions, answers) -> list[float]:
    _need_answers("answer_match", answers)
    return [float(_same(_final_answer(c), _final_answer(a))) for c, a in zip(completions, answers)]


def char_match(prompts, completions, answers) -> list[float]:
    _need_answers("char_match", answers)
    out = []
    for c, a in zip(completions, answers):
        c, a = c.strip(), a.strip()
        hits = sum(x == y for x, y in zip(c, a))
        out.append(hits / max(len(c), len(a), 1))
    return out


FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


def format_answer(prompts, completions, answers) -> list[float]:
    return [float(bool(FORMAT.match(c))) for c in completions]


def single_line(prompts, completions, answers) -> list[float]:
    return [float(bool(c.strip()) and "\n" not in c.strip()) for c in completions]


BUILTIN: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "answer_match": answer_match,
    "char_match": char_match,
    "format_answer": format_answer,
    "single_line": single_line,
}


def resolve(name: str, field: str = "grpo.reward_fns") -> RewardFn:
    """A builtin name or "module:function" -> the function (errors name the config field)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise RunError(
            f"{field}: unknown reward '{name}'; use a builtin ({', '.join(BUILTIN)}) or 'module:function'"
        )
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise RunError(f"{field}: cannot import module '{module}' for reward '{name}' ({e})") from None
    if not callable(fn):
        raise RunError(f"{field}: module '{module}' has no function '{attr}' (reward '{name}')")
    return fn


def combined(names: Sequence[str], field: str = "grpo.reward_fns") -> Callable[..., list[float]]:
    """The sum of the named reward functions, checked to return one finite float per completion."""
    fns = [(n, resolve(n, field)) for n in names]

    def total(prompts, completions, answers) -> list[float]:
        sums = [0.0] * len(completions)
        for name, fn in fns:
            values = [float(v) for v in fn(list(prompts), list(completions), list(answers))]
            if len(values) != len(completions):
                raise RunError(
                    f"reward '{name}' returned {len(values)} values for {len(completions)} completions"
                )
            sums = [s + v for s, v in zip(sums, values)]
        return sums

    return total
