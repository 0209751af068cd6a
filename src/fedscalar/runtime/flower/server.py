"""The server side: a `Runtime` that exchanges a round's messages through a Flower Grid.

Nodes are matched to client ids by the ``partition-id`` in their node config, learned by
a ``query`` to every node the first time it is seen (a restarted node has a new node id
and is queried again; it reports the rounds its model holds, and the server's catch-up
starts there). A node that does not answer a round in time is set aside until it answers
a new set-up query, so a dead one costs a single timeout. Everything a node sends back is
checked by the server before use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedscalar.messages import encode
from fedscalar.privacy.secagg import SecAggError, SecAggServer, default_threshold
from fedscalar.runtime.base import RoundTraffic, RunSetup, Runtime, Summed
from fedscalar.runtime.flower.protocol import QUERY, TRAIN, pack, run_key, unpack

log = logging.getLogger("fedscalar")

QUERY_RETRY = 10.0
"""Seconds after which a set-up query still unanswered is sent again (the node may have
missed it: a ClientApp that failed to start, a message lost with its node's restart)."""
NODE_PATIENCE = 60.0
"""Seconds the server waits at the start for every client id to have a node (at least;
``reply_timeout`` when longer): the first ClientApps of a loaded machine start slowly."""
REPLY_POLL = 0.02
"""Seconds between the server's pulls for replies (Flower's `send_and_receive` waits 3 s)."""


class FlowerRuntime(Runtime):
    def __init__(
        self,
        grid: Grid,
        run: RunSetup,
        wait_for_nodes: float | None = None,
        query_retry: float | None = None,
    ):
        """``wait_for_nodes``: seconds to wait at the start for every client id to have a
        node (default `NODE_PATIENCE`, or ``reply_timeout`` when longer); ``query_retry``:
        seconds after which an unanswered set-up query is sent again (`QUERY_RETRY`).
        The simulation engine runs two messages for one node side by side, the last
        context written winning: there a query is sent again only once the last expired.
        """
        self.grid, self.server, self.cfg = grid, run.server, run.cfg
        self.key, self.toml = run_key(run.cfg), run.cfg.to_toml()
        self.timeout = run.cfg.reply_timeout
        self.secure = run.cfg.secure_aggregation
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.queried: set[int] = set()
        self.pending: dict[str, tuple[int, float]] = {}  # set-up query id -> (node, sent at)
        self.retry: dict[int, float] = {}  # node whose set-up failed -> when it was asked
        self.refused: set[int] = set()  # nodes whose answers do not fit the run
        self.query_retry = QUERY_RETRY if query_retry is None else query_retry
        self.query_ttl = max(self.timeout, NODE_PATIENCE, self.query_retry)
        patience = max(self.timeout, NODE_PATIENCE) if wait_for_nodes is None else wait_for_nodes
        self._await_nodes(patience)

    # -- nodes ----------------------------------------------------------------------------
    def _await_nodes(self, patience: float) -> None:
        """Set up nodes as they connect until every client id has one, or ``patience`` s."""
        deadline = time.monotonic() + patience
        while True:
            self._refresh()
            if len(self.nodes) == self.cfg.clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        log.info("%d of %d client ids have a node", len(self.nodes), self.cfg.clients)

    def _refresh(self) -> None:
        """Forget nodes that left; ask new ones who they are; read answers that arrived.

        Set-up queries are not waited for: a node whose ClientApp starts slowly answers
        later, and its answer is read at the next refresh (every round). A node still
        unanswered after ``query_retry`` s is asked again; the earlier query's answer stays
        welcome until its ttl (`NODE_PATIENCE` s at least) runs out.
        """
        alive = set(self.grid.get_node_ids())
        log.debug("nodes connected: %s", sorted(alive))
        self.nodes = {cid: n for cid, n in self.nodes.items() if n in alive}
        # nodes that left for good (a restarted SuperNode gets a new id) are forgotten
        self.retry = {n: t for n, t in self.retry.items() if n in alive}
        self.queried &= alive
        self.refused &= alive
        self._read_answers()
        now = time.monotonic()
        self.pending = {
            mid: (node, sent)
            for mid, (node, sent) in self.pending.items()
            if node in alive and now - sent <= self.query_ttl
        }
        newest: dict[int, float] = {}
        for node, sent in self.pending.values():
            newest[node] = max(newest.get(node, sent), sent)
        set_up = set(self.nodes.values())
        for node in self.queried - set_up - self.refused:
            last = newest.get(node, self.retry.get(node, -self.query_retry))
            if now - last >= self.query_retry:
                self.queried.discard(node)  # unanswered (or failed) for long enough
        new = sorted(alive - self.queried)
        if new:
            self.queried.update(new)
            ids = self.grid.push_messages([self._query_message(n) for n in new])
            self.pending.update({i: (n, now) for i, n in zip(ids, new, strict=True)})
            self._read_answers()

    def _read_answers(self) -> None:
        """Adopt the nodes whose set-up answers have arrived. An error in place of an
        answer (the query expired unread, or the node failed) is no answer: the node is
        asked again ``query_retry`` s after that query; a node whose answer does not fit
        the run is not asked again."""
        if not self.pending:
            return
        for answer in self.grid.pull_messages(list(self.pending)):
            node, sent = self.pending.pop(answer.metadata.reply_to_message_id, (None, 0.0))
            if node is None:
                continue
            if answer.has_error():
                log.warning("node %d: set-up failed: %s", node, answer.error.reason)
                self.retry[node] = sent
            elif self._adopt(answer):
                self.pending = {m: v for m, v in self.pending.items() if v[0] != node}
            else:
                self.refused.add(node)

    def _query_message(self, node: int) -> Message:
        return Message(
            pack(run=self.key, config=self.toml),
            dst_node_id=node,
            message_type=QUERY,
            ttl=self.query_ttl,
        )

    def _query(self, node_ids: Iterable[int]) -> None:
        """Ask nodes who they are and wait for the answers (at most ``reply_timeout`` s)."""
        out = [self._query_message(n) for n in node_ids]
        self.queried.update(m.metadata.dst_node_id for m in out)
        for answer in self._send_and_receive(out):
            self._adopt(answer)

    def _adopt(self, answer: Message) -> bool:
        """Map the answering node to the client id it serves, at the round it holds."""
        node = answer.metadata.src_node_id
        if answer.has_error():
            log.warning("node %d: set-up failed: %s", node, answer.error.reason)
            return False
        try:
            values = unpack(answer.content)
            if "error" in values:
                raise ValueError(values["error"])
            cid, have = int(values["partition"]), int(values["round"])
            if not (0 <= cid < self.cfg.clients and 0 <= have <= self.server.round):
                raise ValueError(f"partition {cid} holding round {have} does not fit the run")
        except (KeyError, TypeError, ValueError) as e:
            log.warning("node %d: set-up refused: %s", node, e)
            return False
        log.info("client %d: node %d set up, holding round %d", cid, node, have)
        self.nodes[cid] = node
        self.server.mark_synced(cid, have)
        return True

    def _silenced(self, cid: int, node: int) -> None:
        """A node that let a round's message time out gets no more rounds until it
        answers a set-up query again (sent at the next refresh and every ``query_retry`` s
        while Flower lists it): a dead node, which Flower keeps listing for about a
        minute, costs one timeout; a slow or restarted one comes back set up."""
        if self.nodes.get(cid) == node:
            del self.nodes[cid]
            log.info("client %d: node %d did not answer; asked to set up again", cid, node)
        self.queried.discard(node)

    def _send_and_receive(self, out: list[Message]) -> list[Message]:
        """Push ``out`` and pull the replies every `REPLY_POLL` s until all are in or
        ``reply_timeout`` passes (Grid.send_and_receive polls every 3 s)."""
        ids = {i for i in self.grid.push_messages(out) if i}
        deadline = time.monotonic() + self.timeout
        answers: list[Message] = []
        while ids and time.monotonic() < deadline:
            got = self.grid.pull_messages(list(ids))
            for answer in got:
                ids.discard(answer.metadata.reply_to_message_id)
                answers.append(answer)
            if ids and not got:
                time.sleep(REPLY_POLL)
        return answers

    # -- rounds ---------------------------------------------------------------------------
    def run_round(self, rnd, lr, seeds, clients) -> RoundTraffic:
        self._refresh()
        traffic = RoundTraffic({})
        todo = list(clients)
        for attempt in range(2):  # a second pass for nodes that restarted or lost the run
            again = self._exchange(rnd, lr, seeds, todo, traffic, final=attempt == 1)
            if not again:
                break
            todo = again
        if self.secure:
            self._secure(rnd, traffic)
        return traffic

    def _secure(self, rnd: int, traffic: RoundTraffic) -> None:
        """Secure aggregation's steps 2-4 with the clients whose keys came back with
        their training answer; the server ends up with their sum only. A failure (too
        few clients left, a tampered share) leaves the round without contributors."""
        adverts, traffic.replies = traffic.replies, {}
        server = SecAggServer(rnd, default_threshold(len(adverts)))
        try:
            if len(adverts) < 3:
                raise SecAggError(f"{len(adverts)} clients trained, at least 3 needed")
            roster = server.roster(adverts)
            share = {c: {"roster": roster, "threshold": server.threshold} for c in adverts}
            inboxes = server.route(self._phase(rnd, "share", share, traffic))
            masked = self._phase(
                rnd, "mask", {c: {"inbox": b} for c, b in inboxes.items()}, traffic
            )
            for wire in masked.values():
                server.receive(wire)
            request = server.unmask_request()
            ask = {c: {"request": request} for c in sorted(server.masked)}
            total = server.total(self._phase(rnd, "unmask", ask, traffic))
            traffic.summed = Summed(total, sorted(server.masked))
        except SecAggError as e:
            log.warning("round %d: secure aggregation failed: %s", rnd, e)
            for cid in adverts:
                traffic.missing.setdefault(cid, f"secure aggregation failed: {e}")
            traffic.summed = Summed(np.zeros(0), [])

    def _phase(
        self, rnd: int, step: str, payloads: dict[int, dict[str, bytes | int]], traffic
    ) -> dict[int, bytes]:
        """One secure aggregation step: send each client its payload, return the bytes
        each answered with (a client that did not is named in ``traffic.missing``)."""
        out, sent = [], {}
        for cid, extra in payloads.items():
            node = self.nodes.get(cid)
            if node is None:
                traffic.missing[cid] = "no node with this partition-id is set up"
                continue
            traffic.bytes_down += sum(len(v) for v in extra.values() if isinstance(v, bytes))
            content = pack(run=self.key, secagg=step, round=rnd, **extra)
            out.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=TRAIN,
                    group_id=str(rnd),
                    ttl=self.timeout,
                )
            )
            sent[node] = cid
        answers = {a.metadata.src_node_id: a for a in self._send_and_receive(out)}
        got: dict[int, bytes] = {}
        for node, cid in sent.items():
            answer = answers.get(node)
            if answer is None:
                traffic.missing[cid] = f"no {step} answer within {self.timeout:g} s"
                self._silenced(cid, node)
                continue
            if answer.has_error():
                traffic.missing[cid] = f"node error: {answer.error.reason}"
                continue
            try:
                values = unpack(answer.content)
            except ValueError:
                values = {}
            value = values.get("secagg")
            if not isinstance(value, bytes):
                said = f": {values['error']}" if isinstance(values.get("error"), str) else ""
                traffic.missing[cid] = f"unusable {step} answer{said}"
                continue
            got[cid] = value
            traffic.bytes_up += len(value)
        return got

    def _exchange(self, rnd, lr, seeds, todo, traffic: RoundTraffic, final: bool) -> list[int]:
        """Send to each client in ``todo``; return the ones to ask once more."""
        out, sent = [], {}
        for cid in todo:
            node = self.nodes.get(cid)
            if node is None:
                traffic.missing[cid] = "no node with this partition-id is set up"
                continue
            wire = [encode(m) for m in self.server.messages_for(cid, rnd, lr, seeds)]
            traffic.bytes_down += sum(len(w) for w in wire)
            msg = Message(
                pack(run=self.key, messages=wire, **({"secure": True} if self.secure else {})),
                dst_node_id=node,
                message_type=TRAIN,
                group_id=str(rnd),
                ttl=self.timeout,  # a message nobody answered in time is not served later
            )
            out.append(msg)
            sent[node] = cid
        answers = {a.metadata.src_node_id: a for a in self._send_and_receive(out)}
        again = []
        for node, cid in sent.items():
            answer = answers.get(node)
            if answer is None:
                traffic.missing[cid] = f"no reply within {self.timeout:g} s"
                self._silenced(cid, node)
            elif answer.has_error():
                traffic.missing[cid] = f"node error: {answer.error.reason}"
            else:
                again += self._read(cid, node, answer, traffic, final)
        return again

    def _read(self, cid: int, node: int, answer: Message, traffic: RoundTraffic, final: bool):
        try:
            values = unpack(answer.content)
        except ValueError as e:
            traffic.missing[cid] = str(e)
            return []
        key = "advert" if self.secure else "reply"  # secure: the reply stays on the node
        if key in values and isinstance(values[key], bytes):
            traffic.replies[cid] = values[key]
            traffic.bytes_up += len(values[key])
            traffic.missing.pop(cid, None)
            return []
        if not final and isinstance(values.get("behind"), int):
            have = values["behind"]
            if 0 <= have <= self.server.round:
                log.info("client %d holds round %d: sending the rounds it misses", cid, have)
                self.server.mark_synced(cid, have)
                return [cid]
        if not final and values.get("setup") is True:
            self._query([node])
            return [cid] if self.nodes.get(cid) == node else []
        traffic.missing[cid] = f"unusable reply: {str(values)[:200]}"
        return []
