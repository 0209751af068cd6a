"""The node side: a fedscalar client behind a Flower ClientApp.

A ClientApp process keeps one model per run, shared by every client id it serves (as in
the local simulator), so memory does not grow with the number of virtual nodes a
simulation worker hosts. Flower may start a new process for every message (a
deployment's default), so the node also keeps, in its Flower ``context.state``, the
run's config and the global updates its model has applied (28 bytes per round for K=1,
P=5): a new process rebuilds the model and replays them, with no message to the server.
Every `SNAPSHOT_EVERY` rounds the node writes its model state to a local file
(``cache-dir`` in its node config, default ``$FEDSCALAR_CACHE/flower``) and keeps only the
updates after it, so a new process loads the snapshot and replays a bounded tail. A node
that lost even that (a restarted SuperNode) reports the rounds it holds and the server
sends the missing ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedscalar.algorithms import Client, make_client
from fedscalar.algorithms.zo import ProtocolError
from fedscalar.config import RunConfig, build_config_text
from fedscalar.federation import client_data, client_partitions, resolve_device
from fedscalar.messages import (
    CatchUp,
    GlobalUpdate,
    MessageError,
    SeedSync,
    StateMessage,
    TrainRequest,
    WeightsMessage,
    decode,
    encode,
)
from fedscalar.params import ParamSpace
from fedscalar.privacy.secagg import SecAggClient, SecAggError
from fedscalar.rundir import RunDir
from fedscalar.runtime.flower.protocol import RECORD, pack, unpack
from fedscalar.runtime.local import reply_vector
from fedscalar.tasks import build_task
from fedscalar.tasks.hf import cache_dir

SNAPSHOT_EVERY = 50
"""Rounds of updates a node keeps in its memory before writing a state snapshot."""

log = logging.getLogger("fedscalar")


@dataclass
class Session:
    """One run's model, task and client in this process."""

    cfg: RunConfig
    task: Any
    parts: list[Any]
    client: Client

    @property
    def round(self) -> int:
        """Rounds applied to this process's model (FedAvg nodes get weights every round)."""
        return self.client.round


_SESSIONS: dict[str, Session] = {}


def _build(run: str, toml: str) -> Session:
    cfg = build_config_text(toml)
    task = build_task(cfg)
    space = ParamSpace(task.build_model(cfg.seed).to(resolve_device(cfg.device)))
    _SESSIONS.clear()  # one run at a time per process: a new run frees the old model
    _SESSIONS[run] = Session(cfg, task, client_partitions(cfg, task), make_client(cfg, space))
    log.info("node set up for run %s: %s on %s", run, cfg.algorithm, cfg.task)
    return _SESSIONS[run]


# -- what the node remembers between processes (Flower keeps context.state per node) ----
def _memory(context: Context) -> dict[str, Any]:
    return dict(context.state[RECORD]) if RECORD in context.state else {}


def _history(memory: dict[str, Any]) -> list[GlobalUpdate]:
    """The updates applied after the snapshot (rounds snapshot+1 ... in order)."""
    blob = memory.get("history", b"")
    if not blob:
        return []
    msg = decode(blob)
    assert isinstance(msg, CatchUp)
    return list(msg.updates)


def _remember(context: Context, memory: dict[str, Any], history: list[GlobalUpdate]) -> None:
    memory = {**memory, "history": encode(CatchUp(tuple(history))) if history else b""}
    context.state[RECORD] = ConfigRecord(memory)


def _snapshot_path(context: Context, run: str) -> Path:
    folder = Path(str(context.node_config.get("cache-dir", "") or cache_dir() / "flower"))
    return folder / f"{run}-client{context.node_config.get('partition-id', 'x')}.safetensors"


def _session(context: Context, run: str, toml: str | None) -> Session | None:
    """This process's session for ``run``, rebuilt from the node's memory if needed."""
    memory = _memory(context)
    if memory.get("run") != run:
        memory = {}
    toml = toml or memory.get("config")
    if toml is None:
        return None
    session = _SESSIONS.get(run) or _build(run, toml)
    if not memory:
        memory = {"run": run, "config": toml, "snapshot": 0}
        _remember(context, memory, [])
        return session
    client, snap = session.client, int(memory.get("snapshot", 0))
    if client.replicates:
        if client.round < snap:
            path = _snapshot_path(context, run)
            try:
                tensors, meta = RunDir.load_tensors(path)
                if int(meta["round"]) != snap:
                    raise ValueError(f"it holds round {meta['round']}, not {snap}")
                client.load_replica(tensors, snap)
            except Exception as e:  # unreadable: forget it; the server resends what is missing
                log.warning("node snapshot %s unusable (%s); asking the server", path, e)
                _remember(context, {"run": run, "config": toml, "snapshot": 0}, [])
                return session
        history = _history(memory)
        if history and client.round < history[-1].round:
            client.replay(history)
    return session


def _load_own_state(context: Context, session: Session) -> None:
    """Give the client the memory this node kept for its client id (error feedback)."""
    blob = _memory(context).get("client_state", b"")
    if blob:
        client = session.client
        client.load_state_tensors({**client.state_tensors(), **safetensors.torch.load(blob)})


def _note_applied(context: Context, session: Session, messages: list[Any], pid: int) -> None:
    """Add the catch-up the node just applied to its memory, and the client memory of its
    client id; snapshot the model now and then."""
    memory = _memory(context)
    own = {k: v for k, v in session.client.state_tensors().items() if k.endswith(f"::{pid}")}
    if own:
        memory["client_state"] = safetensors.torch.save(own)
    history = _history(memory)
    applied = int(memory.get("snapshot", 0)) + len(history)
    for msg in messages:
        if isinstance(msg, CatchUp):
            for update in msg.updates:
                if update.round == applied + 1:
                    history.append(update)
                    applied += 1
    client = session.client
    # a change it cannot replay from its memory (FedKSeed's seed-sync): snapshot it now
    unreplayable = any(isinstance(m, SeedSync) for m in messages) and client.round > applied
    if unreplayable or (
        client.replicates and len(history) >= SNAPSHOT_EVERY and client.round == applied
    ):
        applied = client.round
        path = _snapshot_path(context, str(memory["run"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        RunDir.save_tensors(path, client.replica_tensors(), {"round": str(applied)})
        memory["snapshot"], history = applied, []
    _remember(context, memory, history)


def _partition(context: Context, session: Session) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("the node has no partition-id in its --node-config")
    pid, clients = int(node["partition-id"]), session.cfg.clients
    if "num-partitions" in node and int(node["num-partitions"]) != clients:
        raise ValueError(f"node has num-partitions={node['num-partitions']}, run has {clients}")
    if not 0 <= pid < clients:
        raise ValueError(f"partition-id {pid} outside 0..{clients - 1}")
    return pid


def _rounds_assumed(messages: list[Any]) -> int:
    """How many rounds the server assumed this node holds when it wrote ``messages``."""
    for msg in messages:
        if isinstance(msg, CatchUp):
            return msg.updates[0].round - 1
        if isinstance(msg, SeedSync):
            return msg.since
        if isinstance(msg, TrainRequest):
            return msg.round - 1
        if isinstance(msg, StateMessage | WeightsMessage):
            return 0  # a full state (or FedAvg's weights) fits any node
    return 0


def _error(message: Message, e: Exception) -> Message:
    return Message(pack(error=f"{type(e).__name__}: {e}"), reply_to=message)


def query(message: Message, context: Context) -> Message:
    """Set up (or find) the run's session; reply with this node's client id and round."""
    try:
        values = unpack(message.content)
        session = _session(context, str(values["run"]), str(values["config"]))
        assert session is not None
        pid = _partition(context, session)
    except Exception as e:  # the reason goes back to the server, which logs it
        return _error(message, e)
    return Message(pack(partition=pid, round=session.round), reply_to=message)


SECAGG = "fedscalar-secagg"
"""The node's record of the round's secure aggregation (its keys stay on the node)."""


def _secagg(message: Message, context: Context, values: dict[str, Any]) -> Message:
    """Secure aggregation's steps 2-4 on this node (step 1 came with its training)."""
    kept = dict(context.state[SECAGG]) if SECAGG in context.state else {}
    if kept.get("rnd") != values.get("round"):
        raise ProtocolError(f"no secure aggregation under way for round {values.get('round')}")
    party = SecAggClient.from_state(kept)
    step = values["secagg"]
    if step == "share":
        out = party.share_keys(bytes(values["roster"]), int(values["threshold"]))
    elif step == "mask":
        vector = np.frombuffer(bytes(kept["vector"]), dtype=np.float64)
        out = party.masked_input(vector, bytes(values["inbox"]))
    elif step == "unmask":
        out = party.unmask(bytes(values["request"]))
    else:
        raise ProtocolError(f"unknown secure aggregation step {step!r}")
    context.state[SECAGG] = ConfigRecord({**party.state(), "vector": kept["vector"]})
    return Message(pack(secagg=out), reply_to=message)


def train(message: Message, context: Context) -> Message:
    """Decode the round's messages, run the client, reply with its encoded message (under
    secure aggregation: keep the reply and answer with the keys of its step 1)."""
    try:
        values = unpack(message.content)
        if "secagg" in values:
            return _secagg(message, context, values)
        session = _session(context, str(values["run"]), None)
        if session is None:
            return Message(pack(setup=True), reply_to=message)
        pid = _partition(context, session)
        messages = [decode(bytes(b)) for b in values["messages"]]
        if session.round < _rounds_assumed(messages):
            return Message(pack(behind=session.round), reply_to=message)
        data = client_data(session.cfg, session.task, session.parts[pid], pid)
        _load_own_state(context, session)
        reply = session.client.handle(messages, data)
        _note_applied(context, session, messages, pid)
        if values.get("secure") is True:
            party = SecAggClient(pid, reply.round)  # type: ignore[attr-defined]
            vector = reply_vector(reply).tobytes()
            context.state[SECAGG] = ConfigRecord({**party.state(), "vector": vector})
            return Message(pack(advert=party.advertise()), reply_to=message)
        return Message(pack(reply=encode(reply)), reply_to=message)
    except (MessageError, ProtocolError, SecAggError, ValueError, KeyError, TypeError) as e:
        return _error(message, e)


client_app = ClientApp()
"""The node's Flower app: set-up queries and train messages (`flwr run`, simulation)."""
client_app.query()(query)
client_app.train()(train)
