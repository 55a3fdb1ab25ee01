"""The control socket as a library: JSON lines in and out, errors as answers, a private socket."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from headmaster import HeadmasterError
from headmaster.daemon import request
from headmaster.daemon.control import MAX_REQUEST_BYTES, ControlServer


def handler(req: dict) -> dict:
    if req["cmd"] == "boom":
        raise RuntimeError("bug")
    if req["cmd"] == "bad":
        raise HeadmasterError("no such thing")
    return {"echo": req}


@pytest.fixture
def server(tmp_path):
    bad = []
    srv = ControlServer(tmp_path / "run" / "hm.sock", handler, on_bad_request=lambda: bad.append(1))
    srv.start()
    srv.bad = bad
    yield srv
    srv.stop()


def test_answers_and_errors(server):
    assert request(server.path, "hello", x=1) == {"echo": {"cmd": "hello", "x": 1}}
    with pytest.raises(HeadmasterError, match="no such thing"):
        request(server.path, "bad")
    with pytest.raises(HeadmasterError, match="internal error: RuntimeError: bug"):
        request(server.path, "boom")
    assert request(server.path, "still") == {"echo": {"cmd": "still"}}  # a failing handler hurts nothing
    assert len(server.bad) == 1


def test_private_socket_and_folder(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


def test_second_server_on_the_same_path_is_refused_and_leaves_the_first_alone(server):
    other = ControlServer(server.path, handler)
    with pytest.raises(HeadmasterError, match="already listening"):
        other.start()
    other.stop()
    assert server.path.exists() and request(server.path, "ping") == {"echo": {"cmd": "ping"}}


def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on, as a crash leaves it
    srv = ControlServer(path, handler)
    srv.start()
    try:
        assert request(path, "x") == {"echo": {"cmd": "x"}}
    finally:
        srv.stop()
    assert not path.exists()


def test_oversized_line_gets_an_answer_then_the_connection_closes(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b"{" * (MAX_REQUEST_BYTES + 10))
        data = s.makefile("rb").readline()
    assert b"too large" in data and server.bad


def test_not_running(tmp_path):
    with pytest.raises(HeadmasterError, match="hmd is not running"):
        request(tmp_path / "none.sock", "status")
