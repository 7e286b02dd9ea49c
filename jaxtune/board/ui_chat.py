"""The board's Chat tab: load a run's export (or any HF directory plus a PEFT adapter), then chat through the
chat template with streamed tokens (jaxtune/board/chat.py). One model is loaded at a time: loading another, or
Unload, frees the first. Sampling fields are `generation.*` config fields, checked as a YAML file's are."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from jaxtune.board import checks
from jaxtune.board.i18n import text
from jaxtune.config import ConfigError, load_config

SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p")


def generation(values: dict[str, str]):
    """(GenerationConfig, {field: error}) from the sampling boxes: the `generation` section of a config."""
    from jaxtune.board import form

    section = {k: form.parse(v, "text") for k, v in values.items() if str(v).strip()}
    try:
        return load_config({"generation": section}).generation, {}
    except ConfigError as e:
        message = str(e)
        field = next((k for k in SAMPLING if message.startswith(f"generation.{k} ")), "")
        return None, {field: message}


def build(board, labels) -> None:
    lang = "en"
    with gr.Row():
        found = labels(gr.Dropdown(exports(board.runs), value=None, label=text("chat_exports", lang),
                                   elem_id="chat-exports", scale=2), "chat_exports")  # fmt: skip
        model_dir = labels(gr.Textbox("", label=text("chat_model", lang), elem_id="chat-model", scale=3), "chat_model")
        adapter_dir = labels(gr.Textbox("", label=text("chat_adapter", lang), elem_id="chat-adapter", scale=2),
                             "chat_adapter")  # fmt: skip
        template = labels(gr.Textbox("", label=text("chat_template", lang), elem_id="chat-template", scale=2),
                          "chat_template")  # fmt: skip
    with gr.Row():
        load_btn = labels(gr.Button(text("load_model", lang), variant="primary", elem_id="chat-load"), "load_model",
                          "value")  # fmt: skip
        unload_btn = labels(gr.Button(text("unload_model", lang), elem_id="chat-unload"), "unload_model", "value")
    loaded = gr.Markdown(text("no_model", lang), elem_id="chat-loaded")
    system = labels(gr.Textbox("", label=text("system", lang), elem_id="chat-system"), "system")
    defaults = load_config(None).generation
    boxes, errors = {}, {}
    with gr.Row():
        for name in SAMPLING:
            with gr.Column(min_width=140):
                boxes[name] = labels(gr.Textbox(str(getattr(defaults, name)), label=text(name, lang),
                                                elem_id=f"chat-{name.replace('_', '-')}"), name)  # fmt: skip
                errors[name] = gr.Markdown("", visible=False, elem_id=f"chat-{name.replace('_', '-')}-error",
                                           elem_classes=["jt-error"])  # fmt: skip
    errors[""] = gr.Markdown("", visible=False, elem_id="chat-error", elem_classes=["jt-error"])
    bot = labels(gr.Chatbot([], label=text("chatbot", lang), elem_id="chatbot", height=360), "chatbot")
    with gr.Row():
        message = labels(gr.Textbox("", label=text("message", lang), elem_id="chat-message", scale=5), "message")
        send = labels(gr.Button(text("send", lang), variant="primary", elem_id="chat-send", scale=1), "send", "value")
        clear = labels(gr.Button(text("clear", lang), elem_id="chat-clear", scale=1), "clear", "value")

    def shown(found: dict[str, str]):
        return [gr.update(value=found.get(k, ""), visible=bool(found.get(k))) for k in errors]

    def on_load(path, adapter, tmpl):
        if not path.strip():
            return "", *shown({"": "give a model directory, or a run directory with an export"})
        try:
            what = board.chat.load(path.strip(), adapter.strip() or None, tmpl.strip() or None)
        except Exception as e:
            return board.chat.loaded or text("no_model", "en"), *shown({"": checks.error_text(e)})
        return f"loaded: {what}", *shown({})

    def on_unload():
        board.chat.unload()
        return text("no_model", "en")

    def on_pick(path):
        """A run's export: a full model directory, or the base model plus an adapter directory."""
        if not path:
            return gr.update(), gr.update()
        config = Path(path) / "adapter_config.json"
        if config.is_file():  # the base model it names (a directory here), else the run (its checkpoint)
            import json

            try:
                base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
            except (OSError, ValueError, AttributeError):
                base = ""
            if base and (Path(base) / "config.json").is_file():
                return base, path
            return str(Path(path).parent), ""
        return path, ""

    found.change(on_pick, [found], [model_dir, adapter_dir])
    load_btn.click(on_load, [model_dir, adapter_dir, template], [loaded, *errors.values()])
    unload_btn.click(on_unload, [], [loaded])

    def on_send(history, msg, sys_prompt, *sampling):
        history = list(history or [])
        gen, found = generation(dict(zip(SAMPLING, sampling)))
        if gen is None or not msg.strip():
            yield history, msg, *shown(found)
            return
        pairs = _pairs(history)
        history = [*history, {"role": "user", "content": msg}, {"role": "assistant", "content": ""}]
        try:
            for partial in board.chat.reply(pairs, msg, sys_prompt.strip() or None, gen):
                history[-1] = {"role": "assistant", "content": partial}
                yield history, "", *shown({})
        except Exception as e:
            yield history[:-2], msg, *shown({"": checks.error_text(e)})
            return
        yield history, "", *shown({})

    outputs = [bot, message, *errors.values()]
    send.click(on_send, [bot, message, system, *boxes.values()], outputs)
    message.submit(on_send, [bot, message, system, *boxes.values()], outputs)
    clear.click(lambda: [], [], [bot])
    board.page_load.append((lambda: f"loaded: {board.chat.loaded}" if board.chat.loaded else text("no_model", "en"),
                            [], [loaded]))  # fmt: skip
    board.page_load.append((lambda: gr.update(choices=exports(board.runs)), [], [found]))


def exports(runs_root: str) -> list[str]:
    """The exports of the runs under `runs_root` (hf/, adapter/, merged/ ...), newest run first."""
    from jaxtune.board import runs

    return [str(Path(r.path) / name) for r in runs.scan(runs_root) for name in r.exports]


def _pairs(history: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages -> the earlier (user, assistant) turns."""
    pairs, user = [], None
    for m in history:
        content = m["content"] if isinstance(m, dict) else m.content
        role = m["role"] if isinstance(m, dict) else m.role
        if isinstance(content, list):  # gradio may wrap text as [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role == "user":
            user = content
        elif role == "assistant" and user is not None:
            pairs.append((user, content))
            user = None
    return pairs
