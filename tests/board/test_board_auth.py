"""The board's token gate: bound to a non-local host, `jaxtune board` makes and prints a token, and every
request without it — the page, its config and API routes, static files, a websocket — is answered 401 before
it reaches gradio; with the token (query string, the cookie the first answer sets, or a Bearer header) it is
served. Bound to localhost without --token, there is no gate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from jaxtune.board.server import COOKIE, Server, TokenGate, free_port, is_local, make_app  # noqa: E402

PATHS = ["/", "/config", "/gradio_api/info", "/gradio_api/queue/join", "/theme.css", "/favicon.ico",
         "/gradio_api/upload", "/assets/index.js", "/nonexistent"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_non_local_host_needs_the_printed_token(tmp_path):
    port = free_port("0.0.0.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "jaxtune", "board", "--host", "0.0.0.0", "--port", str(port),
                             "--runs", str(tmp_path / "runs")], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://0\.0\.0\.0:(\d+)/\?token=(\S+)", line)
        assert match, line
        token = match.group(2)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # the URL is printed before uvicorn listens
            try:
                status, _ = get(base + "/")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and proc.poll() is None, "the board did not start"
                time.sleep(0.3)
        for path in PATHS:
            assert get(base + path)[0] == 401, path
            assert get(base + path + "?token=wrong")[0] == 401, path
            assert get(base + path, {"Authorization": "Bearer wrong"})[0] == 401, path
            assert get(base + path, {"Cookie": f"{COOKIE}=wrong"})[0] == 401, path
        status, headers = get(f"{base}/?token={token}")
        assert status == 200
        cookie = headers.get("set-cookie") or headers.get("Set-Cookie")
        assert cookie.startswith(f"{COOKIE}={token}") and "HttpOnly" in cookie
        assert get(base + "/config", {"Cookie": f"{COOKIE}={token}"})[0] == 200
        assert get(base + "/config", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_websocket_without_token_is_closed():
    import asyncio

    calls = []

    async def app(scope, receive, send):
        calls.append(scope["type"])

    gate = TokenGate(app, "secret")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    asyncio.run(gate({"type": "websocket", "headers": [], "query_string": b""}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 4401}] and calls == []
    asyncio.run(gate({"type": "websocket", "headers": [], "query_string": b"token=secret"}, receive, send))
    assert calls == ["websocket"]


def test_local_board_has_no_gate_and_a_given_token_gates_it(tmp_path):
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5")
    port = free_port()
    server = Server(make_app(str(tmp_path / "runs"), cwd=str(tmp_path)), "127.0.0.1", port).start()
    try:
        assert get(f"http://127.0.0.1:{port}/config")[0] == 200
    finally:
        server.stop()
    port = free_port()
    server = Server(make_app(str(tmp_path / "runs"), token="t0k", cwd=str(tmp_path)), "127.0.0.1", port).start()
    try:
        assert get(f"http://127.0.0.1:{port}/config")[0] == 401
        assert get(f"http://127.0.0.1:{port}/config?token=t0k")[0] == 200
    finally:
        server.stop()
