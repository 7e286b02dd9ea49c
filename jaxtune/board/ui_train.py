"""The board's Train tab: the configure form (jaxtune/board/form.py), then launch and watch the run.

The form's fields are RunConfig fields; "Check config" (and every Start) loads the YAML the form composes
exactly as `jaxtune train` loads a file, and each error appears beside the field it names. Start saves the
YAML and runs `jaxtune train` in its own process (runs.Launcher): a reload or a closed tab never stops it.
The watch panel re-reads the run directory (status.json, metrics.jsonl, board.log) every two seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from jaxtune.board import checks, form, plots
from jaxtune.board.i18n import text

SECTIONS = {
    "sec_model": ("model.path", "model.tokenizer"),
    "sec_method": ("stage", "method.name", "method.rank", "method.alpha", "method.dropout",
                   "method.target_modules", "model.quantization", "method.adapter_size",
                   "method.num_virtual_tokens", "method.freeze_trainable_layers", "dpo.beta", "dpo.loss_type",
                   "ppo.reward_model", "grpo.num_generations", "grpo.reward_fns"),
    "sec_data": ("data.dataset_dir", "data.train", "data.template", "data.cutoff_len", "data.packing",
                 "data.val_size"),
    "sec_training": ("training.learning_rate", "training.num_epochs", "training.max_steps",
                     "training.batch_size", "training.micro_batch_size", "training.warmup_ratio",
                     "training.eval_every", "training.save_every", "logging.log_every", "output_dir"),
}  # fmt: skip
LOG_LINES = 40  # the log box shows the run's last lines (board.log holds all)
assert sorted(k for keys in SECTIONS.values() for k in keys) == sorted(form.KEYS)


def elem(key: str) -> str:
    """The HTML id of a field (tests and CSS find it by this)."""
    return "f-" + key.replace(".", "-").replace("_", "-")


def _widget(key: str, kind: str, value: Any, lang: str):
    label = text(key, lang)
    if kind == "choice":
        return gr.Dropdown(form.choices(key), value=value, label=label, elem_id=elem(key))
    if kind == "bool":
        return gr.Checkbox(value=value, label=label, elem_id=elem(key))
    if kind == "list":
        return gr.Dropdown(value, value=value, multiselect=True, allow_custom_value=True, label=label,
                           elem_id=elem(key))  # fmt: skip
    return gr.Textbox(value=value, label=label, elem_id=elem(key), lines=1, max_lines=1)


def _error_box(key: str):
    return gr.Markdown("", visible=False, elem_id=elem(key) + "-error", elem_classes=["jt-error"])


def build(board, labels, base: str | None) -> None:
    """The tab's components and events, inside the caller's `gr.Tab`."""
    lang = "en"
    base_problem = ""
    try:
        _, base_cfg = form.base_mapping(base)
    except Exception as e:  # a base config that does not load: start from the defaults, and say why
        base_problem = checks.error_text(e)
        base_cfg = form.load_config(None)
    values = form.values_of(base_cfg)
    widgets = dict(form.FIELDS)
    fields: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    with gr.Row():
        base_box = labels(gr.Textbox(base or "", label=text("base_config", lang), elem_id="base-config",
                                     scale=4), "base_config")  # fmt: skip
        load_btn = labels(gr.Button(text("load_base", lang), elem_id="load-base", scale=1), "load_base", "value")
    base_error = gr.Markdown(base_problem, visible=bool(base_problem), elem_id=elem("base") + "-error",
                             elem_classes=["jt-error"])  # fmt: skip
    for section, keys in SECTIONS.items():
        with gr.Accordion(text(section, lang), open=True) as acc:
            labels(acc, section)
            with gr.Row(equal_height=False):
                for key in keys:
                    with gr.Column(min_width=220, visible=form.visible(key, base_cfg.stage, base_cfg.method.name)) as col:
                        fields[key] = labels(_widget(key, widgets[key], values[key], lang), key)
                        errors[key] = _error_box(key)
                    fields[key].column = col
            if section == "sec_model":
                check_btn = labels(gr.Button(text("check_model", lang), elem_id="check-model", size="sm"),
                                   "check_model", "value")  # fmt: skip
                model_out = gr.Markdown("", elem_id="model-info")
            if section == "sec_data":
                with gr.Row():
                    list_btn = labels(gr.Button(text("list_datasets", lang), elem_id="list-datasets", size="sm"),
                                      "list_datasets", "value")  # fmt: skip
                    preview_btn = labels(gr.Button(text("preview", lang), elem_id="preview", size="sm"),
                                         "preview", "value")  # fmt: skip
                preview_out = gr.HTML("", elem_id="preview-out")
    extra = labels(gr.Textbox("", label=text("extra", lang), lines=2, elem_id="extra"), "extra")
    errors[""] = _error_box("general")
    with gr.Row():
        config_path = labels(gr.Textbox(str(Path(board.runs) / "board.yaml"), label=text("config_path", lang),
                                        elem_id="config-path", scale=3), "config_path")  # fmt: skip
        validate_btn = labels(gr.Button(text("validate", lang), elem_id="validate"), "validate", "value")
        save_btn = labels(gr.Button(text("save", lang), elem_id="save"), "save", "value")
        estimate_btn = labels(gr.Button(text("estimate", lang), elem_id="estimate"), "estimate", "value")
    with gr.Row():
        yaml_out = labels(gr.Code("", language="yaml", label=text("yaml", lang), elem_id="yaml", lines=12), "yaml")
        with gr.Column():
            command_out = labels(gr.Code("", language="shell", label=text("command", lang), elem_id="command"),
                                 "command")  # fmt: skip
            estimate_out = gr.Markdown("", elem_id="estimate-out")
    labels(gr.Markdown("### " + text("sec_launch", lang)), "sec_launch", "value", "### {}")
    with gr.Row():
        watch = labels(gr.Textbox("", label=text("watch_run", lang), elem_id="watch-run", scale=3), "watch_run")
        start_btn = labels(gr.Button(text("start", lang), variant="primary", elem_id="start"), "start", "value")
        stop_btn = labels(gr.Button(text("stop", lang), variant="stop", elem_id="stop"), "stop", "value")
        resume_btn = labels(gr.Button(text("resume", lang), elem_id="resume"), "resume", "value")
    launch_out = gr.Markdown("", elem_id="launch-out")
    status_out = gr.Markdown("", elem_id="run-status")
    with gr.Row():
        loss_plot = labels(gr.LinePlot(plots.empty(), x="step", y="value", color="series", label=text("loss_curve", lang),
                                       elem_id="loss-plot", height=320), "loss_curve")  # fmt: skip
        eval_plot = labels(gr.LinePlot(plots.empty(), x="step", y="value", color="series", label=text("eval_curve", lang),
                                       elem_id="eval-plot", height=320), "eval_curve")  # fmt: skip
    log_out = labels(gr.Textbox("", label=text("log", lang), lines=12, max_lines=LOG_LINES, elem_id="log",
                                autoscroll=True, interactive=False), "log")  # fmt: skip

    inputs = [base_box, *fields.values(), extra]
    error_outputs = [base_error, *errors.values()]

    def compose(base_text, *rest):
        values, extra_text = dict(zip(fields, rest[:-1])), rest[-1]
        base_path = base_text.strip() or None
        mapping = form.compose(base_path, values, extra_text)
        return base_path, mapping

    def shown_errors(found: dict[str, str], base_message: str = ""):
        return [gr.update(value=base_message, visible=bool(base_message))] + [
            gr.update(value=found.get(k, ""), visible=bool(found.get(k))) for k in errors
        ]

    def check(base_text, *rest):
        """(checked form, YAML text, command text, error updates) of the form as it stands."""
        path = rest[-1]
        try:
            base_path, mapping = compose(base_text, *rest[:-1])
        except Exception as e:  # the base file itself, or a malformed override line
            message = checks.error_text(e)
            if "override" in message:  # a line of the free box: the general error box
                return None, "", "", shown_errors({"": message})
            return None, "", "", shown_errors({}, message)  # the base file: beside the base config field
        yaml_text = form.yaml_text(mapping)
        checked = form.validate(yaml_text, path)
        command = form.train_command(base_path, mapping, path) if checked.cfg else ""
        return checked, yaml_text, command, shown_errors(checked.errors)

    def on_validate(*args):
        _, yaml_text, command, errs = check(*args)
        return [yaml_text, command, *errs]

    def on_save(*args):
        checked, yaml_text, command, errs = check(*args)
        note = ""
        if checked is not None and checked.cfg is not None:
            path = Path(args[-1])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml_text, encoding="utf-8")
            note = f"saved {path}"
        return [yaml_text, command, note, *errs]

    def on_estimate(*args):
        checked, yaml_text, command, errs = check(*args)
        if checked is None or checked.cfg is None:
            return [yaml_text, command, "", *errs]
        path = Path(args[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml_text, encoding="utf-8")
        ok, out = checks.estimate_text(str(path), cwd=board.cwd)
        shown = f"```\n{out}\n```" if ok else f"<span class='jt-error'>{out}</span>"
        return [yaml_text, command, shown, *errs]

    def on_start(*args):
        checked, yaml_text, command, errs = check(*args)
        if checked is None or checked.cfg is None:
            return [yaml_text, command, "", gr.update(), *errs]
        path = Path(args[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml_text, encoding="utf-8")
        out_dir = checked.cfg.output_dir
        saved = sorted(int(p.name) for p in (Path(board.cwd) / out_dir / "checkpoints").glob("*") if p.name.isdigit())
        try:
            pid = board.launcher.start(str(path), out_dir, cwd=board.cwd)
        except Exception as e:
            return [yaml_text, command, f"<span class='jt-error'>{checks.error_text(e)}</span>", gr.update(), *errs]
        note = f"started `jaxtune train {path}` (pid {pid}) in `{out_dir}`"
        if saved and checked.cfg.training.resume != "never":  # training.resume=auto goes on from there
            note += (f"; it continues the run there from checkpoint {saved[-1]} (for a fresh run, change the output "
                     "directory)")  # fmt: skip
        return [yaml_text, command, note, out_dir, *errs]

    cfg_inputs = [*inputs, config_path]
    validate_btn.click(on_validate, cfg_inputs, [yaml_out, command_out, *error_outputs])
    save_btn.click(on_save, cfg_inputs, [yaml_out, command_out, launch_out, *error_outputs])
    estimate_btn.click(on_estimate, cfg_inputs, [yaml_out, command_out, estimate_out, *error_outputs])
    start_btn.click(on_start, cfg_inputs, [yaml_out, command_out, launch_out, watch, *error_outputs])

    def on_load(base_text):
        base_path = base_text.strip() or None
        try:
            _, cfg = form.base_mapping(base_path)
        except Exception as e:
            return [gr.update() for _ in fields] + [gr.update() for _ in fields] + shown_errors({}, checks.error_text(e))
        vals = form.values_of(cfg)
        updates = []
        for key in fields:
            if widgets[key] == "list":
                updates.append(gr.update(value=vals[key], choices=vals[key]))
            else:
                updates.append(gr.update(value=vals[key]))
        cols = [gr.update(visible=form.visible(k, cfg.stage, cfg.method.name)) for k in fields]
        return updates + cols + shown_errors({})

    columns = [f.column for f in fields.values()]
    load_btn.click(on_load, [base_box], [*fields.values(), *columns, *error_outputs])

    def on_kind(stage, method):
        return [gr.update(visible=form.visible(k, stage, method)) for k in fields]

    for key in ("stage", "method.name"):
        fields[key].change(on_kind, [fields["stage"], fields["method.name"]], columns)

    def on_check_model(path, tokenizer):
        if not path.strip():
            return "", gr.update(value="model.path is empty: give a Hugging Face model directory "
                                 "(or keep model.random_init from the base config)", visible=True)  # fmt: skip
        try:
            return checks.model_info(path.strip(), tokenizer.strip() or None), gr.update(value="", visible=False)
        except Exception as e:
            return "", gr.update(value=checks.error_text(e), visible=True)

    check_btn.click(on_check_model, [fields["model.path"], fields["model.tokenizer"]],
                    [model_out, errors["model.path"]])  # fmt: skip

    def on_list(dataset_dir, current):
        try:
            names = checks.dataset_names(dataset_dir.strip())
        except Exception as e:
            return gr.update(), gr.update(value=checks.error_text(e), visible=True)
        return gr.update(choices=list(dict.fromkeys([*(current or []), *names]))), gr.update(value="", visible=False)

    list_btn.click(on_list, [fields["data.dataset_dir"], fields["data.train"]],
                   [fields["data.train"], errors["data.dataset_dir"]])  # fmt: skip

    def on_preview(*args):
        checked, yaml_text, command, errs = check(*args)
        if checked is None or checked.cfg is None:
            return ["", yaml_text, command, *errs]
        try:
            return [checks.preview_html(checked.cfg), yaml_text, command, *errs]
        except Exception as e:
            found = {"data.train": checks.error_text(e)}
            return ["", yaml_text, command, *shown_errors(found)]

    preview_btn.click(on_preview, cfg_inputs, [preview_out, yaml_out, command_out, *error_outputs])

    def on_stop(run_dir):
        try:
            board.launcher.stop(run_dir.strip())
            return f"sent SIGTERM to the run in `{run_dir}`: it saves a checkpoint, then exits (143)"
        except Exception as e:
            return f"<span class='jt-error'>{checks.error_text(e)}</span>"

    def on_resume(run_dir):
        try:
            pid = board.launcher.resume(run_dir.strip())
            return f"resumed `{run_dir}` (pid {pid}) from its latest checkpoint"
        except Exception as e:
            return f"<span class='jt-error'>{checks.error_text(e)}</span>"

    stop_btn.click(on_stop, [watch], [launch_out])
    resume_btn.click(on_resume, [watch], [launch_out])

    def on_tick(run_dir):
        run_dir = run_dir.strip()
        if not run_dir or not Path(run_dir).is_dir():
            return "", gr.update(), gr.update(), ""
        status, train, evals = plots.watch(board.launcher, run_dir)
        log = board.launcher.log_tail(run_dir).rstrip("\n").split("\n")
        return status, train, evals, "\n".join(log[-LOG_LINES:])

    timer = gr.Timer(2.0)
    timer.tick(on_tick, [watch], [status_out, loss_plot, eval_plot, log_out], show_progress="hidden")
    board.page_load.append((lambda: board.newest_running(), [], [watch]))
