"""The board's page: a language switch and three tabs (Train, Runs, Chat), each built in its own module.

`Board` holds what the page's events share: the runs root, the working directory runs start in, the
`runs.Launcher` of the training processes and the one loaded chat model. Labels are registered as they are
made (`Labels`), so the language switch updates every one of them in a single event.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr

from jaxtune.board import i18n, runs, ui_chat, ui_runs, ui_train
from jaxtune.board.chat import ChatModel

CSS = """
.jt-error, .jt-error p { color: #c62828 !important; font-size: 0.9em; }
.jt-trained { background: #c8e6c9; color: #1b5e20; }
.jt-prompt { color: #757575; }
.jt-sample { white-space: pre-wrap; font-size: 0.9em; }
"""


@dataclasses.dataclass
class Board:
    runs: str  # the runs root: the table lists the run directories under it
    cwd: str  # where training processes start (relative paths in configs resolve here)
    launcher: Any = None
    chat: Any = None
    page_load: list = dataclasses.field(default_factory=list)  # (fn, inputs, outputs) run on each page load

    def newest_running(self) -> str:
        """The run directory to watch after a reload: the newest running one, else the newest."""
        rows = runs.scan(self.runs)
        live = [r for r in rows if r.status == "running"]
        return str((live or rows)[0].path) if rows else ""


class Labels:
    """Every translatable property made so far: (component, label key, property, format)."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str, str, str]] = []

    def __call__(self, component, key: str, attr: str = "label", fmt: str = "{}"):
        self.items.append((component, key, attr, fmt))
        return component

    def updates(self, lang: str) -> list:
        return [gr.update(**{attr: fmt.format(i18n.text(key, lang))}) for _, key, attr, fmt in self.items]


def default_base(cwd: str) -> str | None:
    """configs/demo.yaml of the working directory, when there is one (the offline demo task)."""
    demo = Path(cwd) / "configs" / "demo.yaml"
    return "configs/demo.yaml" if demo.is_file() else None


def build_app(runs_root: str = "runs", cwd: str | None = None, base: str | None = None) -> gr.Blocks:
    cwd = str(Path(cwd or Path.cwd()).resolve())
    board = Board(runs=runs_root, cwd=cwd, launcher=runs.Launcher(), chat=ChatModel())
    labels = Labels()
    with gr.Blocks(title="jaxtune board") as page:
        with gr.Row():
            with gr.Column(scale=5):
                labels(gr.Markdown("## " + i18n.text("title")), "title", "value", "## {}")
                labels(gr.Markdown(i18n.text("subtitle")), "subtitle", "value")
            lang = labels(gr.Dropdown([(v, k) for k, v in i18n.LANGUAGES.items()], value="en", scale=1,
                                      label=i18n.text("language"), elem_id="language"), "language")  # fmt: skip
        with gr.Tabs():
            with gr.Tab(i18n.text("tab_train"), elem_id="tab-train") as tab:
                labels(tab, "tab_train")
                ui_train.build(board, labels, base if base is not None else default_base(cwd))
            with gr.Tab(i18n.text("tab_runs"), elem_id="tab-runs") as tab:
                labels(tab, "tab_runs")
                ui_runs.build(board, labels)
            with gr.Tab(i18n.text("tab_chat"), elem_id="tab-chat") as tab:
                labels(tab, "tab_chat")
                ui_chat.build(board, labels)
        translated = [c for c, *_ in labels.items]
        lang.change(labels.updates, [lang], translated)
        for fn, inputs, outputs in board.page_load:
            page.load(fn, inputs, outputs)
    page.board = board
    return page
