"""The deployment's ClientApp: a thin forwarder to the node's long-lived worker.

Imports no torch and no model: each message Flower starts a process for is handed to the
node's worker (`fedscalar.runtime.flower.worker`), started on the first message, which
keeps the run's model in memory. Node config (``flower-supernode --node-config``):

- ``partition-id``, ``num-partitions``: as for every fedscalar node;
- ``cache-dir``: where the worker's socket, log and the node's snapshots live (default
  ``$FEDSCALAR_CACHE/flower``);
- ``worker-idle``: seconds a worker waits for a message before it exits (default 600);
- ``worker``: ``false`` runs the node code in the ClientApp process itself (a new model
  load per message, Flower's own model).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedscalar.runtime.flower.worker import IDLE_SECONDS, recv_frames, send_frames

START_PATIENCE = 120.0
"""Seconds a new worker may take to listen (it imports torch; the model loads later)."""


def _folder(context: Context) -> Path:
    configured = str(context.node_config.get("cache-dir", "") or "")
    if configured:
        return Path(configured)
    cache = os.environ.get("FEDSCALAR_CACHE", str(Path.home() / ".cache" / "fedscalar"))
    return Path(cache) / "flower"


def socket_path(context: Context) -> Path:
    """The node's worker socket: one per partition (a restarted node finds its worker)."""
    folder = _folder(context)
    who = context.node_config.get("partition-id", context.node_id)
    path = folder / f"worker-p{who}.sock"
    if len(str(path)) > 100:  # the limit of a Unix socket's path
        tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"fedscalar-{os.getuid()}" / f"{tag}-p{who}.sock"
    return path


def _open(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _connect(context: Context) -> socket.socket:
    """A connection to the node's worker, started first if none listens."""
    path = socket_path(context)
    try:
        return _open(path)
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker
        try:
            return _open(path)
        except OSError:
            pass
        idle = str(context.node_config.get("worker-idle", IDLE_SECONDS))
        log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 (the worker's own)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedscalar.runtime.flower.worker", str(path), idle],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_PATIENCE
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the node worker exited with code {proc.returncode}; see "
                    f"{path.with_suffix('.log')}"
                )
            try:
                return _open(path)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the node worker did not listen on {path} in {START_PATIENCE:g} s")


def forward(message: Message, context: Context) -> Message:
    """Hand one message to the node's worker; adopt the context state it returns."""
    if str(context.node_config.get("worker", "true")).lower() in ("false", "0", "no"):
        from fedscalar.runtime.flower import client

        handler = client.query if message.metadata.message_type == "query" else client.train
        return handler(message, context)
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    request = (
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )
    for attempt in range(2):  # a worker that just exited (idle) is started again
        try:
            with _connect(context) as conn:
                send_frames(conn, *request)
                reply_bytes, context_bytes = recv_frames(conn, 2)
            break
        except ConnectionError:
            if attempt:
                raise
    context.state = context_from_proto(ProtoContext.FromString(context_bytes)).state
    return message_from_proto(ProtoMessage.FromString(reply_bytes))


client_app = ClientApp()
"""A deployment node's Flower app (flower-app/pyproject.toml names it)."""
client_app.query()(forward)
client_app.train()(forward)
