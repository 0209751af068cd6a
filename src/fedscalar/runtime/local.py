"""The in-process simulator: one model, sampled clients run one after another.

All clients share the server's model object; each works on it in turn (ZO clients never
modify it, first-order clients load the global weights from their message first), so
memory does not grow with the number of clients. Every message still goes through its
binary encoding, and the byte counts are the lengths of those encodings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedscalar.algorithms import Client, ClientData, Server
from fedscalar.messages import Message, decode, encode


@dataclass
class RoundTraffic:
    replies: dict[int, Message]
    bytes_up: int
    bytes_down: int


class LocalRuntime:
    def __init__(self, server: Server, client: Client, data: Callable[[int], ClientData]):
        self.server, self.client, self.data = server, client, data

    def run_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> RoundTraffic:
        replies: dict[int, Message] = {}
        up = down = 0
        for cid in clients:
            wire_down = [encode(m) for m in self.server.messages_for(cid, rnd, lr, seeds)]
            down += sum(len(b) for b in wire_down)
            reply = self.client.handle([decode(b) for b in wire_down], self.data(cid))
            wire_up = encode(reply)
            up += len(wire_up)
            replies[cid] = decode(wire_up)
        return RoundTraffic(replies, up, down)
