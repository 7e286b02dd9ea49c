"""`jaxtune board` driven in a real headless browser (Debian's chromium through Playwright), as a user would:
configure the demo task, see a field's error, start a run, watch its loss curve grow, stop it (SIGTERM: a
checkpoint, exit 143), resume it to the end, find it in the Runs table, export it and chat with the export.
Assertions are on what the page shows. A screenshot of each tab is written to $JAXTUNE_BOARD_SHOTS (default:
the test's temporary directory) for the notes and the README.

`.ci/run` installs chromium; without it the test is skipped, unless JAXTUNE_REQUIRE_BROWSER=1 (CI sets it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("JAXTUNE_REQUIRE_BROWSER") != "1":
    pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run does)", allow_module_level=True)

pytestmark = pytest.mark.slow

# the demo model (configs/demo.yaml), trained for a few steps: slow enough on a CPU (a few tenths of a second a
# step) that the run is still going when the page shows its first points
BASE = """\
stage: sft
output_dir: runs/demo
model:
  tokenizer: "builtin:chars"
  random_init: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128,
                tie_word_embeddings: true}
data:
  train: ["builtin:demo"]
  cutoff_len: 48
  bucket_multiple: 8
method:
  name: full
training:
  learning_rate: 3.0e-3
  max_steps: 400
  batch_size: 16
  eval_every: 20
  save_every: 1000
  eval_generate: 0
  prefetch: 0
logging:
  log_every: 2
  progress: false
"""
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip


def field(page, elem_id: str):
    """The text input of a gradio Textbox / Dropdown with `elem_id`."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def wait_text(page, elem_id: str, pattern: str, timeout: float = 120) -> str:
    """Poll the text of #elem_id (and of its text boxes) until it matches `pattern` (a regex); return it."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        box = page.locator(f"#{elem_id}")
        seen = box.inner_text() + "\n".join(t.input_value() for t in box.locator("textarea").all())
        if re.search(pattern, seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"#{elem_id} never showed /{pattern}/ in {timeout} s; it shows: {seen!r}")


def shot(page, directory: Path, name: str) -> None:
    page.screenshot(path=str(directory / f"board_{name}.png"), full_page=True)


@pytest.fixture
def board(tmp_path, monkeypatch):
    from jaxtune.board.server import Server, free_port, make_app

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(BASE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    port = free_port()
    server = Server(make_app("runs", cwd=str(tmp_path)), "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/", tmp_path
    server.stop()
    for status in (tmp_path / "runs").glob("*/board.json"):  # never leave a run behind a failed test
        try:
            os.killpg(json.loads(status.read_text())["pid"], 9)
        except (OSError, KeyError, ValueError):
            pass


def test_board_configure_train_stop_resume_export_chat(board):
    url, root = board
    shots = Path(os.environ.get("JAXTUNE_BOARD_SHOTS") or root)
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        # the form starts from configs/demo.yaml: its values are in the fields
        assert field(page, "f-training-max-steps").input_value() == "400"
        assert field(page, "f-model-tokenizer").input_value() == "builtin:chars"

        # an invalid value: the YAML loader's own message, beside the field
        field(page, "f-training-learning-rate").fill("-1")
        page.locator("#validate").click()
        err = wait_text(page, "f-training-learning-rate-error", r"must be > 0")
        assert "training.learning_rate must be > 0, got -1.0 (runs/board.yaml, line" in err
        field(page, "f-training-learning-rate").fill("abc")
        page.locator("#validate").click()
        wait_text(page, "f-training-learning-rate-error", r"expects a number but got str 'abc'")

        # the demo task, with a run directory of its own
        field(page, "f-training-learning-rate").fill("0.003")
        field(page, "f-output-dir").fill("runs/web")
        page.locator("#validate").click()
        wait_text(page, "yaml", r"output_dir: runs/web")
        assert not page.locator("#f-training-learning-rate-error").is_visible()
        command = wait_text(page, "command", r"jaxtune train runs/board.yaml")
        assert "output_dir=runs/web" in command
        page.locator("#preview").click()
        sample = wait_text(page, "preview-out", r"<\|assistant\|>")
        assert "word" in sample  # the demo's instructions: "Reverse the word." / "Uppercase the word."
        page.locator("#estimate").click()
        wait_text(page, "estimate-out", r"total / device", timeout=180)

        # start: the run is a process of its own; its curve and status update on the page
        page.locator("#start").click()
        wait_text(page, "launch-out", r"started jaxtune train runs/board.yaml", timeout=30)
        assert field(page, "watch-run").input_value() == "runs/web"
        first = wait_text(page, "run-status", r"running · step [1-9]\d*/400", timeout=240)
        step1 = int(re.search(r"step (\d+)/", first).group(1))
        wait_text(page, "run-status", r"loss \d")
        line = page.locator("#loss-plot .mark-line path").first
        line.wait_for(timeout=20000)  # the curve is drawn ...
        drawn = line.get_attribute("d")
        later = wait_text(page, "run-status", rf"running · step (?!{step1}/)\d+/400 · loss \d.* tokens/s")
        assert int(re.search(r"step (\d+)/", later).group(1)) > step1
        deadline = time.monotonic() + 20
        while line.get_attribute("d") == drawn:  # ... and grows as the run logs
            assert time.monotonic() < deadline, "the loss curve did not change"
            time.sleep(0.5)
        wait_text(page, "log", r"first step", timeout=20)
        shot(page, shots, "train")

        page.locator("#stop").click()
        wait_text(page, "launch-out", r"sent SIGTERM")
        stopped = wait_text(page, "run-status", r"stopped", timeout=120)
        stop_step = int(re.search(r"step (\d+)/", stopped).group(1))
        assert stop_step < 400
        assert (root / "runs" / "web" / "checkpoints" / str(stop_step)).is_dir()

        page.locator("#resume").click()
        wait_text(page, "launch-out", r"resumed")
        wait_text(page, "run-status", r"finished · step 400/400", timeout=600)
        log = (root / "runs" / "web" / "board.log").read_text()
        assert "resum" in log.lower() and str(stop_step) in log

        # Runs: the finished run in the table, exported from there
        page.locator("#tab-runs-button").click()
        page.locator("#runs-refresh").click()
        table = wait_text(page, "runs-table", r"finished")
        assert "web" in table and "sft" in table and "full" in table
        page.locator("#export").click()
        exported = wait_text(page, "export-out", r"exported to|failed", timeout=180)
        assert "exported to" in exported, exported
        out_dir = re.search(r"exported to (\S+)", exported).group(1)
        assert (root / out_dir / "config.json").is_file() or Path(out_dir, "config.json").is_file()
        shot(page, shots, "runs")

        # Chat with the export: the reply streams into the conversation, as `jaxtune generate` answers
        page.locator("#tab-chat-button").click()
        field(page, "chat-model").fill(out_dir)
        page.locator("#chat-load").click()
        wait_text(page, "chat-loaded", r"loaded: ", timeout=120)
        field(page, "chat-temperature").fill("-1")
        field(page, "chat-message").fill("Reverse the word.\nabcde")
        page.locator("#chat-send").click()
        wait_text(page, "chat-temperature-error", r"generation.temperature must be >= 0")
        field(page, "chat-temperature").fill("0")
        page.locator("#chat-send").click()
        wait_text(page, "chatbot", r"Reverse the word")
        expected = _generate(out_dir, "Reverse the word.\nabcde")
        assert expected.strip(), "the trained demo model answers something"
        reply = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
        deadline = time.monotonic() + 60
        while reply.count() == 0 or reply.inner_text().strip() != expected.strip():
            assert time.monotonic() < deadline, f"the reply shows {reply.inner_text() if reply.count() else None!r}"
            time.sleep(0.5)
        shot(page, shots, "chat")

        # the language switch relabels the page
        page.locator("#language input").click()
        page.get_by_role("option", name="中文").click()
        wait_text(page, "tab-train-button", r"训练")
        page.locator("#tab-train-button").click()
        page.get_by_text("学习率").first.wait_for(timeout=20000)
        shot(page, shots, "train_zh")
        browser.close()


def _generate(model_dir: str, prompt: str) -> str:
    """What `jaxtune generate --temperature 0` answers (the reference for the page's reply)."""
    import io
    from types import SimpleNamespace

    from jaxtune import generate_cli
    from jaxtune.config import GenerationConfig

    loaded = generate_cli.load(model_dir)
    args = SimpleNamespace(prompt=[prompt], file=None, system=None, template=None, raw=False, jsonl=False,
                           batch_size=1, seed=0, generation=GenerationConfig(temperature=0.0))  # fmt: skip
    out = io.StringIO()
    (text,) = generate_cli.run_generate(args, loaded, out=out)
    return text
