"""Messages between hmd's supervisor and its worker process: length-prefixed JSON over a socketpair.

Request:  {"op": "decide", "args": {"head": "colour", "paths": ["/abs/a.jpg", ...]}}
Answer:   {"ok": true, "result": ..., "loaded": true}
      or  {"ok": false, "error": "one line", "kind": "user" | "bug", "loaded": false}
`loaded` says whether the worker holds the embedding model after the request. Two optional keys,
for hmd's log: `ready_at` (wall clock when a fresh worker was set up: with its first answer) and
`timings` (an embedding's numbers: seconds, load_seconds, embed_seconds, hashed, embedded).
Only plain data crosses: paths, hashes, bucket names, scores, metrics. No vectors, no
pickles: a worker that misbehaves can send nothing the supervisor would execute.
End of stream means the worker is gone (it exited or was killed).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class WorkerGone(Exception):
    """The other end closed the stream (the worker died or exited)."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":"), default=str).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            raise WorkerGone()
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> dict[str, Any]:
    """The next message; WorkerGone at end of stream."""
    (size,) = HEADER.unpack(_read_exactly(sock, HEADER.size))
    if size > MAX_MESSAGE_BYTES:
        raise WorkerGone()  # a corrupt stream: treat the peer as gone
    return json.loads(_read_exactly(sock, size))
