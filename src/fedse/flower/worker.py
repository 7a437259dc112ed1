"""A long-lived process per SuperNode that holds the base model across messages.

Flower's deployment engine starts a fresh `flwr-clientapp` process for every message, which
would load the base model every round. `fedse flower node` therefore runs this worker beside
the SuperNode: it listens on `<data-dir>/worker.sock` (a Unix socket, mode 0600, so only the
node's user can talk to it; `socket_path` where that path is too long for a socket) and answers each message with `client_app.handle`, keeping the
model loaded in between. The ClientApp process only forwards the message content to it.

The framing is fedse's own, local to one machine (`fedse.flower.codec.pack`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import tempfile
import traceback
from pathlib import Path

from flwr.app import RecordDict

from fedse.errors import UserError
from fedse.flower.codec import pack, unpack

SOCKET_NAME = "worker.sock"
MAX_SOCKET_PATH = 100
"""Bytes of a Unix socket's path the kernel accepts (108 on Linux, 104 on macOS), with a margin."""


def socket_path(data_dir: str | Path) -> Path:
    """`<data-dir>/worker.sock`, or where the data dir's path is too long for a Unix socket, a
    socket named after it in a folder only this user may enter under the system's temp folder."""
    path = Path(str(data_dir)).expanduser().resolve() / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    private = Path(tempfile.gettempdir()) / f"fedse-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    status = private.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:  # someone else's, or open to others
        raise UserError(
            f"{private} is not a folder only you can enter; remove it, or give the node a shorter --data-dir"
        )
    return private / f"{hashlib.sha256(os.fsencode(path)).hexdigest()[:16]}.sock"


def worker_socket(node_config: dict) -> Path | None:
    """The worker's socket for this node, when `fedse flower node` runs one."""
    data_dir = node_config.get("data-dir")
    path = socket_path(data_dir) if data_dir else None
    return path if path is not None and path.is_socket() else None


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("!Q", len(data)) + data)


def _receive(conn: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = conn.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("the other side closed the connection mid-message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    (size,) = struct.unpack("!Q", exactly(8))
    return exactly(size)


def forward(path: Path, message_type: str, content: RecordDict) -> RecordDict:
    """Have the worker at `path` answer one message; its error is raised here."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        _send(conn, message_type.encode() + b"\n" + pack(content))
        reply = _receive(conn)
    if reply[:1] == b"E":
        raise RuntimeError(f"fedse worker at {path}: {reply[1:].decode()}")
    return unpack(reply[1:])


def serve(node_config: dict, ready=None) -> None:
    """Answer messages on `<data-dir>/worker.sock` until the process is stopped."""
    from fedse.flower.client_app import handle

    Path(str(node_config["data-dir"])).expanduser().mkdir(parents=True, exist_ok=True)
    path = socket_path(node_config["data-dir"])
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(4)
        if ready is not None:
            ready()
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    try:
                        request = _receive(conn)
                        kind, _, body = request.partition(b"\n")
                        reply = b"O" + pack(handle(kind.decode(), unpack(body), node_config))
                    except Exception as error:  # the ClientApp reports it to the server as the node's error
                        reply = b"E" + f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=3)}".encode()
                    with contextlib.suppress(OSError):  # the ClientApp went away: nothing to tell
                        _send(conn, reply)
        finally:
            path.unlink(missing_ok=True)
