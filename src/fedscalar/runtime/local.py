"""The in-process simulator: one model, sampled clients run one after another.

All clients share the server's model object; each works on it in turn (ZO clients never
modify it, first-order clients load the global weights from their message first), so
memory does not grow with the number of clients. Every message still goes through its
binary encoding, and the byte counts are the lengths of those encodings.

With ``count_bytes=False`` (MeZO: one party training on the pooled data) the messages
never leave the party, so nothing is counted.
"""

from __future__ import annotations

from collections.abc import Callable

from fedscalar.algorithms import Client, ClientData, Server
from fedscalar.messages import decode, encode
from fedscalar.runtime.base import RoundTraffic, Runtime


class LocalRuntime(Runtime):
    def __init__(
        self,
        server: Server,
        client: Client,
        data: Callable[[int], ClientData],
        count_bytes: bool = True,
    ):
        self.server, self.client, self.data = server, client, data
        self.count_bytes = count_bytes

    def run_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> RoundTraffic:
        replies: dict[int, bytes] = {}
        up = down = 0
        for cid in clients:
            wire_down = [encode(m) for m in self.server.messages_for(cid, rnd, lr, seeds)]
            down += sum(len(b) for b in wire_down)
            reply = self.client.handle([decode(b) for b in wire_down], self.data(cid))
            replies[cid] = encode(reply)
            up += len(replies[cid])
        if not self.count_bytes:
            up = down = 0
        return RoundTraffic(replies, {}, up, down)
