"""Serving the review page with uvicorn: in a thread beside hmd's work, or in the foreground (`hm serve`).

The socket is bound here, before uvicorn starts, so a busy port is one clear error at start
and a configured port 0 (tests) tells us the port the system chose.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from typing import Any

import uvicorn

from headmaster.config import check_listen
from headmaster.web.app import create_app
from headmaster.web.backend import ReviewBackend
from headmaster.web.security import Guard, url_host

START_TIMEOUT_S = 10.0


class WebError(Exception):
    """The page cannot be served (bad address, port in use)."""


class _QuietServer(uvicorn.Server):
    """uvicorn wakes every 100 ms to refresh its Date header and look for an exit flag. hmd idles at zero
    CPU, so this server sends no Date header and sleeps until it is told to stop."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await super().startup(sockets)

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default headers once
        while not self.should_exit:
            await self._stop.wait()

    def request_stop(self) -> None:
        self.should_exit = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def handle_exit(self, sig: int, frame: Any) -> None:  # Ctrl-C / SIGTERM under `hm serve`
        super().handle_exit(sig, frame)
        self.request_stop()


class WebServer:
    def __init__(self, backend: ReviewBackend, listen: str, token: str = ""):
        try:
            host, port = check_listen(listen, token)
        except ValueError as e:
            raise WebError(f"[web] listen: {e}") from None
        self.sock = _bind(host, port)
        self.guard = Guard(host, self.sock.getsockname()[1], token)
        config = uvicorn.Config(create_app(backend, self.guard), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, date_header=False,
                                server_header=False)
        self.server = _QuietServer(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.guard.host in ("0.0.0.0", "") else "::1" if self.guard.host == "::" else \
            self.guard.host
        return f"http://{url_host(host)}:{self.guard.port}/"

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "listen": f"{url_host(self.guard.host)}:{self.guard.port}",
                "token": bool(self.guard.token)}

    def start(self) -> str:
        """Serve from a thread of its own (its own event loop); returns the page's address."""
        self.thread = threading.Thread(target=self._run, name="hm-web", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise WebError(f"the review page did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def serve_forever(self) -> None:
        """Serve in the foreground until Ctrl-C (uvicorn handles SIGINT and SIGTERM)."""
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.request_stop()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = " (is hmd already serving the page there? `hmctl status` shows its address)" \
            if e.errno == errno.EADDRINUSE else ""
        raise WebError(f"cannot listen on {url_host(host)}:{port}: {e.strerror or e}{hint}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock
