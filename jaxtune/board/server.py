"""`jaxtune board`: serve the page (jaxtune/board/app.py) with uvicorn, behind a token gate when it is reachable
from other machines.

Bound to 127.0.0.1 by default. A non-loopback `--host` needs a token: `--token T`, or one is made and printed
with the URL. With a token, every HTTP request and websocket must carry it — as `?token=T` (the first page
load; the answer then sets an HttpOnly cookie the page's own requests carry), the cookie, or an
`Authorization: Bearer T` header — or it is answered 401 and never reaches gradio.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from jaxtune.errors import RunError

COOKIE = "jaxtune_board_token"
EXTRA = 'pip install -e ".[board]"'


class TokenGate:
    """ASGI middleware: requests without the token get 401 (websockets are closed) before reaching `app`."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    def _given(self, scope) -> tuple[bool, bool]:
        """(authorised, the token came in the query string)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no token
            cookie = SimpleCookie()
        bearer = headers.get("authorization", "")
        bearer = bearer[7:] if bearer.lower().startswith("bearer ") else ""
        found = [query, cookie[COOKIE].value if COOKIE in cookie else "", bearer]
        ok = any(t and hmac.compare_digest(t.encode(), self.token.encode()) for t in found)
        return ok, bool(query) and hmac.compare_digest(query.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        ok, from_query = self._given(scope)
        if not ok:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401})
                return
            body = b"401 Unauthorized: this jaxtune board needs its token (open the URL it printed, ?token=...)\n"
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b"Bearer")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        if not from_query or scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(runs: str = "runs", token: str | None = None, cwd: str | None = None, base: str | None = None):
    """The ASGI app: gradio's page mounted on FastAPI, behind `TokenGate` when `token` is given."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a training box
    try:
        import gradio as gr
        from fastapi import FastAPI
    except ImportError as e:
        raise RunError(f"jaxtune board needs the board extra ({e.name} is not installed): {EXTRA}") from None
    from jaxtune.board.app import CSS, build_app

    page = build_app(runs, cwd=cwd, base=base)
    app = gr.mount_gradio_app(FastAPI(), page, path="", css=CSS)
    app.state.board = page.board
    return TokenGate(app, token) if token else app


class Server:
    """uvicorn in a thread (tests) or in the foreground (`jaxtune board`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 7860):
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 60) -> Server:
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="jaxtune-board")
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RunError(f"jaxtune board: the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(args) -> int:
    """`jaxtune board [--host H] [--port P] [--runs DIR] [--token T] [--config BASE]`."""
    if args.config:  # a base config that does not load is the same error as for `jaxtune train`
        from jaxtune.config import load_config

        load_config(args.config)
    token = args.token
    if not is_local(args.host) and not token:
        token = secrets.token_urlsafe(18)
    try:  # before gradio builds the page: a busy port is one line, not uvicorn's exit
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise RunError(f"jaxtune board: cannot listen on {args.host}:{args.port} ({e.strerror}); pass another "
                       "--port, or --host of this machine") from None  # fmt: skip
    app = make_app(args.runs, token=token, base=args.config)
    server = Server(app, args.host, args.port)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"jaxtune board: {url}  (runs: {args.runs}; Ctrl-C stops the board, not the runs it started)",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.server.run()
    except KeyboardInterrupt:
        pass
    return 0
