"""The board's Runs tab: every run directory under --runs (stage, method, model, steps, best metric, status),
several runs' curves overlaid, and the export of a finished run (`jaxtune export`, in its own process)."""

from __future__ import annotations

import gradio as gr

from jaxtune.board import checks, plots, runs
from jaxtune.board.i18n import text

HEADERS = ["run", "stage", "method", "model", "steps", "best", "status", "exports", "path"]
EXPORT_KINDS = ("auto", "adapter", "merge")


def table(runs_root: str) -> tuple[list[list[str]], list[str]]:
    rows = runs.scan(runs_root)
    data = [[r.name, r.stage, r.method, r.model, r.steps, r.best, r.status, ", ".join(r.exports), str(r.path)]
            for r in rows]  # fmt: skip
    return data, [str(r.path) for r in rows]


def build(board, labels) -> None:
    lang = "en"
    data, paths = table(board.runs)
    refresh = labels(gr.Button(text("refresh", lang), elem_id="runs-refresh", size="sm"), "refresh", "value")
    grid = labels(gr.Dataframe(data, headers=HEADERS, label=text("runs_table", lang), interactive=False,
                               elem_id="runs-table", wrap=True), "runs_table")  # fmt: skip
    with gr.Row():
        chosen = labels(gr.Dropdown(paths, value=paths[:2], multiselect=True, label=text("compare", lang),
                                    elem_id="compare-runs", scale=3), "compare")  # fmt: skip
        metric = labels(gr.Dropdown(_metrics(paths[:2]), value="train/loss", allow_custom_value=True,
                                    label=text("metric", lang), elem_id="compare-metric"), "metric")  # fmt: skip
    curves = labels(gr.LinePlot(plots.overlay(paths[:2], "train/loss"), x="step", y="value", color="series",
                                label=text("compare_plot", lang), elem_id="compare-plot", height=300),
                    "compare_plot")  # fmt: skip
    with gr.Row():
        target = labels(gr.Dropdown(paths, value=paths[0] if paths else None, label=text("export_run", lang),
                                    elem_id="export-run", scale=3), "export_run")  # fmt: skip
        kind = labels(gr.Radio(list(EXPORT_KINDS), value="auto", label=text("export_kind", lang),
                               elem_id="export-kind"), "export_kind")  # fmt: skip
        export_btn = labels(gr.Button(text("export", lang), elem_id="export"), "export", "value")
    export_out = labels(gr.Textbox("", label=text("export_out", lang), lines=4, interactive=False,
                                   elem_id="export-out"), "export_out")  # fmt: skip

    def on_refresh(selected, export_target):
        data, paths = table(board.runs)
        keep = [p for p in (selected or []) if p in paths] or paths[:2]
        return (
            gr.update(value=data),
            gr.update(choices=paths, value=keep),
            gr.update(choices=paths, value=export_target if export_target in paths else (paths[0] if paths else None)),
        )

    refresh.click(on_refresh, [chosen, target], [grid, chosen, target])

    def on_compare(selected, metric_name):
        selected = selected or []
        return plots.overlay(selected, metric_name or "train/loss"), gr.update(choices=_metrics(selected))

    chosen.change(on_compare, [chosen, metric], [curves, metric])
    metric.change(on_compare, [chosen, metric], [curves, metric])

    def on_export(run_dir, how):
        if not run_dir:
            return "choose a run to export"
        try:
            code, output, out_dir = runs.export(run_dir, how)
        except Exception as e:
            return checks.error_text(e)
        head = f"exported to {out_dir}" if code == 0 else f"jaxtune export failed (exit status {code})"
        return f"{head}\n{output.strip()}"

    export_btn.click(on_export, [target, kind], [export_out])
    board.page_load.append((lambda: on_refresh([], None), [], [grid, chosen, target]))


def _metrics(run_dirs: list[str]) -> list[str]:
    names = [f"{split}/{key}" for split, key in runs.metric_names(run_dirs)] if run_dirs else []
    return names or ["train/loss"]
