"""The control socket: one JSON object per line in, one JSON object per line out.

Requests look like {"cmd": "status"} or {"cmd": "retrain", "head": "colour"}.
Answers are {"ok": true, "result": ...} or {"ok": false, "error": "..."}.
Malformed, oversized or unknown requests get an error answer; nothing a client
sends can raise out of a connection thread. The socket is mode 0600 and, when
hmd creates its folder, that folder is 0700.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from headmaster import HeadmasterError

MAX_REQUEST_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 30.0  # a client that sends nothing for this long is dropped

Handler = Callable[[dict[str, Any]], Any]


def encode(answer: dict[str, Any]) -> bytes:
    return (json.dumps(answer, separators=(",", ":"), default=str) + "\n").encode()


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line -> its dict; HeadmasterError says what is wrong with it."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeadmasterError(f"malformed request: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cmd"), str):
        raise HeadmasterError('malformed request: expected an object like {"cmd": "status"}')
    return data


def _serve_connection(conn: socket.socket, handler: Handler, on_bad_request: Callable[[], None]) -> None:
    """Answer each request line on one connection until the client closes it."""
    conn.settimeout(IDLE_TIMEOUT_S)
    try:
        with conn, conn.makefile("rb") as rfile:
            while True:
                line = rfile.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST_BYTES:
                    on_bad_request()
                    conn.sendall(encode({"ok": False, "error": f"request too large (limit {MAX_REQUEST_BYTES} bytes)"}))
                    _drain(conn)  # the rest of that line is unreadable: drop the connection, politely
                    return
                if line.strip():
                    conn.sendall(encode(_answer(line, handler, on_bad_request)))
    except (OSError, ValueError):  # the client went away or timed out
        return


def _drain(conn: socket.socket, limit: int = 16 * MAX_REQUEST_BYTES) -> None:
    """Close our side, then read (briefly, boundedly) what the client still sends: closing with unread
    data would reset the connection before the client reads our answer."""
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(1.0)
    while limit > 0 and (chunk := conn.recv(65536)):
        limit -= len(chunk)


def _answer(line: bytes, handler: Handler, on_bad_request: Callable[[], None]) -> dict[str, Any]:
    try:
        return {"ok": True, "result": handler(parse_request(line))}
    except HeadmasterError as e:
        on_bad_request()
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a bug must not take the daemon down: log it, answer it
        logger.exception("control request failed: {!r}", line[:200])
        return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}


def prepare_socket_path(path: Path) -> None:
    """Create the socket's folder (0700); refuse if a live daemon answers there, else clear a stale socket."""
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise HeadmasterError(f"cannot create the socket folder {folder}: {e.strerror or e}") from None
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise HeadmasterError(f"{path} exists and is not a socket; remove it or set daemon.socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # nobody listens: a leftover from a crash
        else:
            raise HeadmasterError(f"another hmd is already listening on {path}")
        finally:
            probe.close()


class ControlServer:
    """Accepts connections on a Unix socket; each connection gets its own thread. Blocks, never polls."""

    def __init__(self, path: Path, handler: Handler, on_bad_request: Callable[[], None] = lambda: None):
        self.path = Path(path)
        self.handler = handler
        self.on_bad_request = on_bad_request
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise HeadmasterError(f"cannot create the control socket {self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="hmd-control", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the socket was shut down: stop()
            threading.Thread(target=_serve_connection, args=(conn, self.handler, self.on_bad_request),
                             name="hmd-control-conn", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self._sock.close()
            if self._thread is not None:
                self._thread.join(timeout=2)
        if self._sock is None:
            return  # never bound: the path, if any, belongs to someone else
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(path: Path, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request to a running hmd and return its result; HeadmasterError when it fails."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise HeadmasterError(f"hmd is not running (no daemon listening on {path})") from None
        except PermissionError:
            raise HeadmasterError(f"permission denied on {path} (the socket belongs to another user)") from None
        sock.sendall(encode({"cmd": cmd, **args}))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise HeadmasterError(f"hmd did not answer within {timeout:.0f}s ({path})") from None
    finally:
        sock.close()
    if not data:
        raise HeadmasterError(f"hmd closed the connection without an answer ({path})")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise HeadmasterError(answer.get("error", "unknown error"))
    return answer.get("result")
