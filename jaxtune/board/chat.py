"""The board's chat: one model in memory at a time, replies streamed token by token (no gradio here).

    chat = ChatModel()
    chat.load("runs/demo")                          # -> "runs/demo: llama, 1.2 M params, chat template: ..."
    for text in chat.reply([("hi", "hello!")], "and now?", None, GenerationConfig(temperature=0)):
        show(text)                                  # the reply so far, growing

It is `jaxtune chat` with the decoder of `jaxtune.generate.stream`: the same loading (`generate_cli.load`: a
Hugging Face directory, + an optional PEFT adapter, or a jaxtune run directory), the same prompt (the chat
template over the history, `generate_cli.encode`), the same stop tokens and stop strings, so the final text
equals what `jaxtune generate` prints with the same settings. A lock serialises decoding (a second browser tab
waits for the first reply) and loading: a load or unload asked for while a reply streams ends that reply at
its next token, then frees the old model before reading the new one.
"""

from __future__ import annotations

import gc
import itertools
import math
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

from jaxtune import generate_cli
from jaxtune.board.checks import count_text
from jaxtune.errors import JaxtuneError
from jaxtune.generate_cli import GenerateError, Loaded

NOTHING_LOADED = "no model is loaded: load a model directory (or a run directory) first"


@dataclass
class _Current:
    loaded: Loaded
    template: str | None
    description: str



def _template_name(tokenizer, template: str | None) -> str:
    """What the prompts are rendered with. An error: an unknown name, or no name and a tokenizer without a
    template of its own."""
    from jaxtune.data.templates import TEMPLATES
    from jaxtune.data.tokenize import resolve_template

    if template in (None, "", "jinja", "tokenizer"):
        if not getattr(tokenizer, "chat_template", None):
            raise GenerateError(
                "the tokenizer has no chat template of its own; choose one of "
                f"{', '.join(sorted(TEMPLATES))} (the format the model was trained with)"
            )
        return "tokenizer's own"
    resolve_template(tokenizer, template)  # RunError: unknown chat template 'x' (did you mean ...)
    return "custom Jinja" if "{%" in template or "{{" in template else template


def describe(model_dir: str, adapter_dir: str | None, loaded: Loaded, template: str) -> str:
    import jax

    params = sum(math.prod(x.shape) for x in jax.tree.leaves(loaded.variables))
    what = f"{model_dir} + adapter {adapter_dir}" if adapter_dir else model_dir
    return f"{what}: {loaded.arch.model_type}, {count_text(params)} params, chat template: {template}"


class ChatModel:
    """One model loaded at a time; loading another unloads the first (drops references, jax.clear_caches() /
    gc so memory is freed)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: _Current | None = None
        self._epoch = 0  # bumped by load / unload: a streaming reply that sees it change ends
        self._tickets = itertools.count(1)

    @property
    def loaded(self) -> str | None:
        """The description of the loaded model, or None."""
        current = self._current
        return current.description if current else None

    def load(self, model_dir: str, adapter_dir: str | None = None, template: str | None = None) -> str:
        """Load a model -> a one-line description of it. The one before is freed first (two need not fit in
        memory at once): when the new one fails to load, none is loaded."""
        model_dir, adapter_dir = str(model_dir).strip(), (str(adapter_dir).strip() if adapter_dir else None)
        template = template or None
        self._epoch = next(self._tickets)
        with self._lock:
            self._drop()
            try:
                loaded = generate_cli.load(model_dir, adapter_dir or None)
                name = _template_name(loaded.tokenizer, template)
            except JaxtuneError:
                raise
            except Exception as e:  # a broken file deep inside a loader: say which directory, in one line
                what = f"{model_dir} with adapter {adapter_dir}" if adapter_dir else model_dir
                raise GenerateError(f"cannot load {what}: {type(e).__name__}: {e}") from e
            self._current = _Current(loaded, template, describe(model_dir, adapter_dir, loaded, name))
            return self._current.description

    def unload(self) -> None:
        self._epoch = next(self._tickets)
        with self._lock:
            self._drop()

    def _drop(self) -> None:  # with the lock held
        import jax

        if self._current is None:
            return
        self._current = None
        gc.collect()  # the weights go with their last reference
        jax.clear_caches()  # and the decoders compiled for them (their cache keys hold the architecture)

    def prompt_ids(self, history: list[tuple[str, str]], message: str, system: str | None = None
                   ) -> list[int]:  # fmt: skip
        """The prompt `reply` decodes from: the chat template over the history and the new message."""
        with self._lock:
            return self._prompt_ids(self._require(), history, message, system)

    def _require(self) -> _Current:
        if self._current is None:
            raise GenerateError(NOTHING_LOADED)
        return self._current

    @staticmethod
    def _prompt_ids(current: _Current, history, message: str, system: str | None) -> list[int]:
        messages = [m for user, assistant in history for m in (("user", user), ("assistant", assistant))]
        messages.append(("user", message))
        tokenizer = current.loaded.tokenizer
        return generate_cli.encode(tokenizer, messages, system or None, current.template, raw=False)

    def reply(self, history: list[tuple[str, str]], message: str, system: str | None, gen, seed: int = 0
              ) -> Iterator[str]:  # fmt: skip
        """The reply to `message` after the (user, assistant) turns of `history`, as the cumulative text after
        each token (only when it changed; at least once), cut at the first stop string of `gen.stop`
        (a GenerationConfig)."""
        from jaxtune.generate import cut_at_stop, stream

        with self._lock:
            current, epoch = self._require(), self._epoch
            m = current.loaded
            ids = self._prompt_ids(current, history, message, system)
            stops = generate_cli.stop_token_ids(m, gen.stop)
            tokens = stream(
                m.arch, m.variables, ids, stops, max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, seed=seed,
            )  # fmt: skip
            out: list[int] = []
            text, shown = "", None
            with closing(tokens):
                for token in tokens:
                    if self._epoch != epoch:  # a load or unload waits for the lock
                        return
                    out.append(token)
                    text, hit = cut_at_stop(m.tokenizer.decode(out, skip_special_tokens=True), gen.stop)
                    if hit:
                        break
                    if text != shown and not text.endswith("\ufffd"):  # not half a multi-byte character
                        shown = text
                        yield text
            if text != shown:
                yield text
