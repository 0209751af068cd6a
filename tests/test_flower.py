"""The Flower runtime gives the local simulator's results, node restarts included."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict

from fedscalar import RunConfig, run
from fedscalar.ledger import Ledger
from fedscalar.rundir import RunDir
from fedscalar.runtime.flower import client, server
from fedscalar.runtime.flower.protocol import pack, unpack
from fedscalar.runtime.flower.server import FlowerRuntime

SMALL = dict(task="digits", clients=4, sampled=2, eval_every=5, batch_size=16)


@pytest.fixture
def server_identity(monkeypatch):
    """Flower stamps new messages with the sending process's identity (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """An in-process stand-in for Flower's Grid: nodes answer through the ClientApp code.

    ``fresh_process`` drops the in-memory model before every message, as a deployment's
    new ClientApp process per message does; only ``context.state`` survives.
    """

    def __init__(self, clients: int, fresh_process: bool = True):
        self.contexts = {100 + i: self._context(100 + i, i, clients) for i in range(clients)}
        self.fresh_process, self.rounds_seen, self.hooks = fresh_process, set(), {}
        self.sent, self.held, self.pushed = [], {}, 0

    @staticmethod
    def _context(node: int, pid: int, clients: int) -> Context:
        config = {"partition-id": pid, "num-partitions": clients}
        return Context(
            run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={}
        )

    def restart(self, pid: int, new_node: int) -> None:
        """The node serving ``pid`` restarts: a new node id, its memory gone."""
        old = next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == pid)
        clients = self.contexts[old].node_config["num-partitions"]
        del self.contexts[old]
        self.contexts[new_node] = self._context(new_node, pid, clients)
        client._SESSIONS.clear()

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            ids.append(msg.metadata.message_id)
            self.held.update({r.metadata.reply_to_message_id: r for r in self._deliver([msg])})
        return ids

    def pull_messages(self, message_ids):
        return [self.held.pop(i) for i in message_ids if i in self.held]

    def send_and_receive(self, messages, *, timeout=None):
        return self._deliver(messages)

    def _deliver(self, messages):
        replies = []
        for msg in messages:
            meta = msg.metadata
            if meta.group_id and meta.group_id not in self.rounds_seen:
                self.rounds_seen.add(meta.group_id)
                if meta.group_id in self.hooks:
                    self.hooks.pop(meta.group_id)(self)
            context = self.contexts.get(meta.dst_node_id)
            if context is None:
                continue  # a dead node: no reply within the timeout
            if self.fresh_process:
                client._SESSIONS.clear()
            self.sent.append((meta.message_type, context.node_config["partition-id"]))
            replies.append(self.handle(msg, context))
        return replies

    def handle(self, msg, context):
        handler = client.query if msg.metadata.message_type == "query" else client.train
        return handler(msg, context)


def _run_on(grid, cfg):
    client._SESSIONS.clear()
    return run(cfg, runtime=lambda r: FlowerRuntime(grid, r))


def _same_run(a, b):
    """Same ledger and weights (client memory, error-feedback residuals, lives on the
    nodes in a Flower run: not in its checkpoint)."""
    assert (a / "ledger.bin").read_bytes() == (b / "ledger.bin").read_bytes()
    wa, _ = RunDir.load_tensors(RunDir(a).checkpoint)
    wb, _ = RunDir.load_tensors(RunDir(b).checkpoint)
    wa = {k: v for k, v in wa.items() if not k.startswith("residual::")}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "algorithm",
    [
        "decomfl",
        "hiso",
        "fedavg",
        "feedsign",
        "ferret",
        "fedzo",
        "fedavg-topk",
        "fedavg-qsgd",
    ],
)
@pytest.mark.usefixtures("server_identity")
def test_flower_runtime_matches_the_local_simulator(tmp_path, algorithm):
    cfg = RunConfig(algorithm=algorithm, rounds=8, **SMALL)
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    grid = FakeGrid(4)
    _run_on(grid, cfg.model_copy(update={"out": str(tmp_path / "flower"), "runtime": "flower"}))
    _same_run(tmp_path / "local", tmp_path / "flower")
    # a new process per message rebuilt the model from the node's memory: no extra messages
    assert sum(1 for kind, _ in grid.sent if kind == "train") == 8 * 2


@pytest.mark.parametrize(
    "algorithm,mode,noise",
    [("decomfl", "central", 0.5), ("hiso", "local", 0.5)],
)
@pytest.mark.usefixtures("server_identity")
def test_private_runs_on_flower_match_the_local_simulator(tmp_path, algorithm, mode, noise):
    """Central DP noises on the server, local DP on each node: with the same seed of the
    noise, the ledgers agree bit for bit (without one, each party keeps its own secret)."""
    dp = dict(dp_noise_multiplier=noise, dp_mode=mode, dp_seed=11, dp_clip=1.0)
    cfg = RunConfig(algorithm=algorithm, rounds=6, **SMALL, **dp)
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    _run_on(
        FakeGrid(4), cfg.model_copy(update={"out": str(tmp_path / "flower"), "runtime": "flower"})
    )
    _same_run(tmp_path / "local", tmp_path / "flower")
    plain = tmp_path / "plain"
    run(
        cfg.model_copy(
            update={
                "out": str(plain),
                "dp_noise_multiplier": None,
                "dp_seed": None,
                "dp_mode": "central",
            }
        )
    )
    noised, _ = RunDir.load_tensors(RunDir(tmp_path / "local").checkpoint)
    clean, _ = RunDir.load_tensors(RunDir(plain).checkpoint)
    assert any(not torch.equal(noised[k], clean[k]) for k in clean)  # the noise was applied


@pytest.mark.usefixtures("server_identity")
def test_a_node_that_missed_its_set_up_query_is_asked_again(tmp_path, monkeypatch):

    class LosesFirstQuery(FakeGrid):
        lost = False

        def _deliver(self, messages):
            if not self.lost:
                kept = [m for m in messages if m.metadata.dst_node_id != 101]
                if len(kept) < len(messages):
                    self.lost = True  # node 101's first query never arrives
                messages = kept
            return super()._deliver(messages)

    monkeypatch.setattr(server, "QUERY_RETRY", 0.0)
    grid = LosesFirstQuery(4)
    out = tmp_path / "flower"
    cfg = RunConfig(algorithm="decomfl", rounds=4, runtime="flower", out=str(out), **SMALL)
    _run_on(grid, cfg)
    assert grid.lost and ("query", 1) in grid.sent
    assert all(m["replies"] == 2 for m in RunDir(out).read_metrics()[1:])


@pytest.mark.usefixtures("server_identity")
def test_deployment_nodes_keep_the_model_in_a_worker_across_messages(tmp_path):
    """The deployment's ClientApp forwards to one long-lived worker per node: the same
    ledger as the simulator, the model loaded once per node, a killed worker replaced."""
    import os
    import signal

    from fedscalar.runtime.flower import node

    class WorkerGrid(FakeGrid):
        def handle(self, msg, context):
            return node.forward(msg, context)

    grid = WorkerGrid(4)
    for context in grid.contexts.values():
        context.node_config.update({"cache-dir": str(tmp_path / "cache"), "worker-idle": 60})
    cfg = RunConfig(algorithm="hiso", rounds=8, **SMALL)
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))

    def kill_worker_of_client_1(_grid):
        context = next(c for c in grid.contexts.values() if c.node_config["partition-id"] == 1)
        log = node.socket_path(context).with_suffix(".log").read_text()
        pid = int(log.split("worker pid ")[1].split()[0])
        os.kill(pid, signal.SIGKILL)

    grid.hooks["5"] = kill_worker_of_client_1
    try:
        _run_on(grid, cfg.model_copy(update={"out": str(tmp_path / "flower"), "runtime": "flower"}))
        _same_run(tmp_path / "local", tmp_path / "flower")
        logs = {p.name: p.read_text() for p in (tmp_path / "cache").glob("worker-p*.log")}
        assert sorted(logs) == [f"worker-p{i}.log" for i in range(4)]
        for name, text in logs.items():  # one model per worker life: one more after a kill
            lives = 2 if name == "worker-p1.log" else 1
            assert text.count("worker pid") == lives and text.count("node set up") == lives
    finally:
        for sock in (tmp_path / "cache").glob("*.sock"):
            sock.unlink()  # the workers exit within a second


@pytest.mark.parametrize("algorithm", ["fedkseed", "fedkseed-pro"])
@pytest.mark.usefixtures("server_identity")
def test_fedkseed_on_flower_agrees_with_the_local_simulator_within_its_tolerance(
    tmp_path, algorithm
):
    """Nodes catch up by seed-sync (the summed change per pool direction, in one pass)
    where the simulator's clients share the server's weights: the two agree to float32
    rounding per sync, so their measurements, and the runs, drift apart only slightly.
    A new process per message rebuilds the node's model from its snapshot."""
    from fedscalar.ledger import Ledger

    cfg = RunConfig(algorithm=algorithm, rounds=8, **SMALL)
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    grid = FakeGrid(4)
    _run_on(grid, cfg.model_copy(update={"out": str(tmp_path / "flower"), "runtime": "flower"}))
    local, flower = (Ledger.open(tmp_path / n / "ledger.bin").updates for n in ("local", "flower"))
    assert len(local) == len(flower) == 8
    for u, v in zip(local, flower, strict=True):
        assert (u.round, u.seeds, u.lr) == (v.round, v.seeds, v.lr)  # same pool seeds drawn
        np.testing.assert_allclose(v.scalars, u.scalars, rtol=0.05, atol=1e-3)
    wa, _ = RunDir.load_tensors(RunDir(tmp_path / "local").checkpoint)
    wb, _ = RunDir.load_tensors(RunDir(tmp_path / "flower").checkpoint)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wb) < 1e-4
    assert sum(1 for kind, _ in grid.sent if kind == "train") == 8 * 2  # no node fell behind


@pytest.mark.usefixtures("server_identity")
def test_attackers_on_flower_stay_in_step_like_honest_nodes(tmp_path):
    """An attacker's node reports its model's true round: nobody is replayed from round 0."""
    cfg = RunConfig(
        algorithm="decomfl", rounds=8, attack="sign-flip", attackers=1, aggregator="median", **SMALL
    )
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    grid = FakeGrid(4)
    out = tmp_path / "flower"
    _run_on(grid, cfg.model_copy(update={"out": str(out), "runtime": "flower"}))
    _same_run(tmp_path / "local", out)
    assert sum(1 for kind, _ in grid.sent if kind == "train") == 8 * 2
    local, flower = RunDir(tmp_path / "local").read_metrics(), RunDir(out).read_metrics()
    assert [m["bytes_down"] for m in flower] == [m["bytes_down"] for m in local]


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("lose_snapshots", [False, True])
def test_nodes_snapshot_their_model_and_replay_a_short_tail(tmp_path, monkeypatch, lose_snapshots):
    monkeypatch.setattr(client, "SNAPSHOT_EVERY", 3)
    monkeypatch.setenv("FEDSCALAR_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(algorithm="hiso", rounds=12, **SMALL)
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    grid = FakeGrid(4)
    if lose_snapshots:  # a node's disk cache is wiped: it falls back to the server's catch-up
        grid.hooks["9"] = lambda g: shutil.rmtree(tmp_path / "cache" / "flower")
    out = tmp_path / "flower"
    _run_on(grid, cfg.model_copy(update={"out": str(out), "runtime": "flower"}))
    _same_run(tmp_path / "local", out)
    snapshots = list((tmp_path / "cache" / "flower").glob("*.safetensors"))
    assert snapshots and all("client" in p.name for p in snapshots)
    for context in grid.contexts.values():  # memory holds only the tail after the snapshot
        memory = client._memory(context)
        assert len(client._history(memory)) < 3 + 1 + 2  # < SNAPSHOT_EVERY + one catch-up
    extra = sum(1 for kind, _ in grid.sent if kind == "train") - 12 * 2
    assert extra == 0 if not lose_snapshots else extra > 0


@pytest.mark.usefixtures("server_identity")
def test_a_set_up_query_that_expired_unread_is_sent_again(tmp_path, monkeypatch):
    """Flower answers a pull for a query that expired (ttl) with an error message in
    place of the node's answer: that node is asked again, not dropped for the run."""

    class ExpiresFirstQuery(FakeGrid):
        expired = False

        def _deliver(self, messages):
            late = [m for m in messages if m.metadata.dst_node_id == 101 and not self.expired]
            if late:
                self.expired = True
                error = Error(code=1, reason="Message Unavailable")
                rest = [m for m in messages if m is not late[0]]
                return [Message(error, reply_to=late[0]), *super()._deliver(rest)]
            return super()._deliver(messages)

    monkeypatch.setattr(server, "QUERY_RETRY", 0.0)
    grid = ExpiresFirstQuery(4)
    out = tmp_path / "flower"
    cfg = RunConfig(algorithm="decomfl", rounds=3, runtime="flower", out=str(out), **SMALL)
    _run_on(grid, cfg)
    log = (out / "run.log").read_text()
    assert grid.expired and "node 101: set-up failed: Message Unavailable" in log
    assert "client 1: node 101 set up" in log and "4 of 4 client ids have a node" in log


@pytest.mark.usefixtures("server_identity")
def test_a_restarted_node_catches_up_by_replay(tmp_path):
    from tests.test_replies import Faulty

    cfg = RunConfig(algorithm="hiso", rounds=10, clients=3, sampled=3, eval_every=5)
    # the node serving client 1 dies during round 5 (its reply is lost) and comes back
    # with a new node id and no memory; the same run locally, with that reply missing:
    local = tmp_path / "local"
    missing = lambda rnd, cid, attempt: "missing" if (rnd, cid) == (5, 1) else None  # noqa: E731
    run(cfg.model_copy(update={"out": str(local)}), runtime=lambda r: Faulty(r, missing))
    grid = FakeGrid(3)
    grid.hooks["5"] = lambda g: g.restart(pid=1, new_node=900)
    out = tmp_path / "flower"
    # (the lost reply costs reply_timeout: 1 s here)
    flower = {"out": str(out), "runtime": "flower", "reply_timeout": 1.0}
    _run_on(grid, cfg.model_copy(update=flower))
    _same_run(local, out)
    assert "client 1: node 900 set up, holding round 0" in (out / "run.log").read_text()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (metrics[5]["replies"], metrics[5]["rejected"]) == (2, 1)
    assert all(m["replies"] == 3 for m in metrics[6:])
    # round 6: the new node gets rounds 1-5 (11 + 5 x 28 B), the others round 5 only
    assert metrics[6]["bytes_down"] == (11 + 5 * 28 + 14) + 2 * (11 + 28 + 14)


class Lingering(FakeGrid):
    """Node 101 (client 1) dies when round 3 starts, but stays listed, as Flower lists a
    node for about a minute after it went silent; every message pushed to it is counted."""

    def __init__(self, clients):
        super().__init__(clients)
        self.hooks["3"] = lambda g: g.contexts.pop(101)
        self.to_dead: list[str] = []

    def get_node_ids(self):
        return sorted({*self.contexts, 101})

    def push_messages(self, messages):
        dead = "3" in self.rounds_seen or any(m.metadata.group_id == "3" for m in messages)
        self.to_dead += [
            m.metadata.message_type for m in messages if dead and m.metadata.dst_node_id == 101
        ]
        return super().push_messages(messages)


@pytest.mark.usefixtures("server_identity")
def test_a_dead_node_costs_one_timeout(tmp_path):
    out = tmp_path / "r"
    cfg = RunConfig(
        rounds=8,
        clients=3,
        sampled=3,
        eval_every=8,
        runtime="flower",
        out=str(out),
        reply_timeout=0.5,
    )
    grid = Lingering(3)
    _run_on(grid, cfg)
    # one round message timed out; after it, no round waits for the dead node: it gets
    # only set-up queries, pushed without waiting (nobody answers them)
    assert grid.to_dead.count("train") == 1 and set(grid.to_dead) <= {"train", "query"}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["replies"] for m in metrics[1:]] == [3, 3, 2, 2, 2, 2, 2, 2]
    log = (out / "run.log").read_text()
    assert "client 1: node 101 did not answer; asked to set up again" in log
    assert "client 1 left out: no node with this partition-id is set up" in log


class Hostile(FakeGrid):
    """Node 101 (client 1) answers train messages with ``answer(message)``."""

    def __init__(self, clients, answer):
        super().__init__(clients)
        self.answer = answer

    def _deliver(self, messages):
        honest = [m for m in messages if not self._hostile(m)]
        return super()._deliver(honest) + [self.answer(m) for m in messages if self._hostile(m)]

    @staticmethod
    def _hostile(m):
        return m.metadata.dst_node_id == 101 and m.metadata.message_type == "train"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda m: Message(RecordDict(), reply_to=m), "message without a 'fedscalar' record"),
        (lambda m: Message(Error(code=5, reason="boom"), reply_to=m), "node error: boom"),
        (lambda m: Message(pack(reply="not bytes"), reply_to=m), "unusable reply"),
        (lambda m: Message(pack(behind=10**6), reply_to=m), "unusable reply"),
    ],
)
@pytest.mark.usefixtures("server_identity")
def test_a_hostile_node_is_left_out(tmp_path, answer, reason):
    out = tmp_path / "r"
    cfg = RunConfig(rounds=4, clients=3, sampled=3, eval_every=4, runtime="flower", out=str(out))
    _run_on(Hostile(3, answer), cfg)
    log = (out / "run.log").read_text()
    assert f"client 1 left out: {reason}" in log
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["replies"] == 2 and m["rejected"] == 1 for m in metrics[1:])


@pytest.mark.parametrize(
    "algorithm,extra",
    [
        ("decomfl", {}),
        ("hiso", dict(dp_noise_multiplier=0.5, dp_mode="local", dp_seed=3)),  # clients noise
        ("decomfl", dict(secure_aggregation=True, sampled=4)),  # keys kept in node contexts
    ],
)
def test_flower_simulation_engine_matches_the_local_simulator(tmp_path, algorithm, extra):
    cfg = RunConfig(algorithm=algorithm, rounds=6, **{**SMALL, **extra})
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    run(cfg.model_copy(update={"out": str(tmp_path / "sim"), "runtime": "flower-simulation"}))
    _same_run(tmp_path / "local", tmp_path / "sim")


@pytest.mark.usefixtures("server_identity")
def test_secure_aggregation_on_flower_matches_the_local_simulator(tmp_path):
    """The four secure aggregation steps go through the grid, each node keeping its keys
    and reply in its own context between them; the masks cancel exactly, so the ledger
    and the byte counts are the simulator's."""
    cfg = RunConfig(rounds=5, secure_aggregation=True, **{**SMALL, "sampled": 4})
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    grid = FakeGrid(4)
    out = tmp_path / "flower"
    _run_on(grid, cfg.model_copy(update={"out": str(out), "runtime": "flower"}))
    _same_run(tmp_path / "local", out)
    local, flower = RunDir(tmp_path / "local").read_metrics(), RunDir(out).read_metrics()
    keys = ("bytes_up", "bytes_down", "contributors")
    assert [[m.get(k) for k in keys] for m in flower] == [[m.get(k) for k in keys] for m in local]
    assert sum(1 for kind, _ in grid.sent if kind == "train") == 5 * 4 * 4  # 4 steps a round


class DropsAfterSharing(FakeGrid):
    """Node 102 (client 2) never answers round 3's masking step, as if it died after
    sharing its keys: the others' masks with it must be removed from the sum."""

    def _deliver(self, messages):
        kept = [
            m
            for m in messages
            if not (
                m.metadata.group_id == "3"
                and m.metadata.dst_node_id == 102
                and unpack(m.content).get("secagg") == "mask"
            )
        ]
        return super()._deliver(kept)


class DropsAfterSharingOnce(DropsAfterSharing):
    """As `DropsAfterSharing`, for the first masking step of round 3 only."""

    dropped = False

    def _deliver(self, messages):
        if self.dropped:
            return FakeGrid._deliver(self, messages)
        kept = super()._deliver(messages)
        self.dropped = len(kept) < len(messages)
        return kept


@pytest.mark.usefixtures("server_identity")
def test_a_secure_round_short_of_min_replies_is_asked_again_whole(tmp_path, monkeypatch):
    """A secure sum cannot take a late client in: the whole round is run again, and the
    run ends as the simulator's."""
    monkeypatch.setattr(server, "QUERY_RETRY", 0.0)
    cfg = RunConfig(
        rounds=4,
        secure_aggregation=True,
        reply_timeout=0.5,
        min_replies=4,
        **{**SMALL, "sampled": 4},
    )
    run(cfg.model_copy(update={"out": str(tmp_path / "local")}))
    out = tmp_path / "flower"
    grid = DropsAfterSharingOnce(4)
    _run_on(grid, cfg.model_copy(update={"out": str(out), "runtime": "flower"}))
    assert grid.dropped
    assert "round 3: 3 clients in the secure sum, 4 needed" in (out / "run.log").read_text()
    _same_run(tmp_path / "local", out)
    assert [m.get("contributors") for m in RunDir(out).read_metrics()[1:]] == [[0, 1, 2, 3]] * 4


@pytest.mark.usefixtures("server_identity")
def test_a_node_lost_after_sharing_leaves_the_round_to_the_survivors(tmp_path):
    cfg = RunConfig(rounds=4, secure_aggregation=True, reply_timeout=0.5, **{**SMALL, "sampled": 4})
    out = tmp_path / "flower"
    _run_on(DropsAfterSharing(4), cfg.model_copy(update={"out": str(out), "runtime": "flower"}))
    metrics = RunDir(out).read_metrics()
    assert metrics[3]["contributors"] == [0, 1, 3]
    assert all(m["contributors"] == [0, 1, 2, 3] for m in metrics[1:3])
    assert metrics[3]["rejected"] == 1 and metrics[3]["replies"] == 3
    updates = Ledger.open(out / "ledger.bin").updates
    # unremoved masks would leave values of order 2**39 in the mean
    assert len(updates) == 4 and np.abs(updates[2].scalars).max() < 10
