"""A node's long-lived worker: the run's model stays in memory across Flower messages.

Flower 1.41 starts a new ClientApp process for every message a SuperNode receives, and
a language model takes seconds to import and load. The deployment's ClientApp
(`fedscalar.runtime.flower.node`) is therefore thin: it imports neither torch nor the
model, starts this worker on the node's first message (one per node, in its own
session, listening on a Unix socket that only its user can open), and hands it each
message with the node's context. The worker runs the node code (`client.query`,
`client.train`) on its in-memory session and hands back the reply and the context, whose
``state`` the ClientApp gives back to Flower. A worker that is gone (killed, or idle for
``worker-idle`` seconds, default 600) is started again by the next message; the node's
memory in ``context.state`` rebuilds its model as before.

Frames on the socket: ``u32`` length, then bytes. A request is two frames (the Flower
message and context as protobuf), the answer two frames (the reply and the context).

    python -m fedscalar.runtime.flower.worker SOCKET [IDLE_SECONDS]
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
from pathlib import Path

IDLE_SECONDS = 600.0


def send_frames(conn: socket.socket, *frames: bytes) -> None:
    conn.sendall(b"".join(struct.pack("<I", len(f)) + f for f in frames))


def recv_frames(conn: socket.socket, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack("<I", _recv_exactly(conn, 4))
        out.append(_recv_exactly(conn, n))
    return out


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-message")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def handle(message_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes]:
    """Run the node code on one message; the reply and the updated context, as protobuf."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from fedscalar.runtime.flower import client
    from fedscalar.runtime.flower.protocol import QUERY

    message = message_from_proto(ProtoMessage.FromString(message_bytes))
    context = context_from_proto(ProtoContext.FromString(context_bytes))
    handler = client.query if message.metadata.message_type == QUERY else client.train
    reply = handler(message, context)
    return (
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def serve(path: Path, idle: float = IDLE_SECONDS) -> None:
    """Answer requests on ``path`` one at a time until none comes for ``idle`` seconds
    or the socket file is removed."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket is the user's only
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(4)
    print(f"worker pid {os.getpid()} listening on {path}", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    listener.settimeout(1.0)
    last = time.monotonic()
    try:
        while path.exists() and time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            last = time.monotonic()
            with conn:
                try:
                    request = recv_frames(conn, 2)
                    start = time.perf_counter()
                    answer = handle(*request)
                    took = time.perf_counter() - start
                    send_frames(conn, *answer)
                except (ConnectionError, struct.error):
                    continue  # the ClientApp went away: it will send again
                print(f"handled a message in {took:.4f} s", flush=True)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else IDLE_SECONDS)
