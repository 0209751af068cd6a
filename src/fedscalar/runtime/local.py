"""The in-process simulator: one model, sampled clients run one after another.

All clients share the server's model object; each works on it in turn (ZO clients never
modify it, first-order clients load the global weights from their message first), so
memory does not grow with the number of clients. Every message still goes through its
binary encoding, and the byte counts are the lengths of those encodings.

With ``count_bytes=False`` (MeZO: one party training on the pooled data) the messages
never leave the party, so nothing is counted. With ``secure=True`` a reply never leaves
its client: the sampled clients run secure aggregation (`fedscalar.privacy.secagg`) on
their reply vectors and the server gets the sum only; its messages are what is counted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedscalar.algorithms import Client, ClientData, Server
from fedscalar.messages import Message, ScalarReply, decode, encode
from fedscalar.privacy.secagg import secure_sum
from fedscalar.runtime.base import RoundTraffic, Runtime, Summed


class LocalRuntime(Runtime):
    def __init__(
        self,
        server: Server,
        client: Client,
        data: Callable[[int], ClientData],
        count_bytes: bool = True,
        secure: bool = False,
    ):
        self.server, self.client, self.data = server, client, data
        self.count_bytes, self.secure = count_bytes, secure

    def run_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> RoundTraffic:
        replies: dict[int, bytes] = {}
        vectors: dict[int, np.ndarray] = {}
        up = down = 0
        for cid in clients:
            wire_down = [encode(m) for m in self.server.messages_for(cid, rnd, lr, seeds)]
            down += sum(len(b) for b in wire_down)
            reply = self.client.handle([decode(b) for b in wire_down], self.data(cid))
            if self.secure:  # the reply stays with its client; only masked values leave
                vectors[cid] = reply_vector(reply)
                continue
            replies[cid] = encode(reply)
            up += len(replies[cid])
        if not self.count_bytes:
            up = down = 0
        if not self.secure:
            return RoundTraffic(replies, {}, up, down)
        exchange = secure_sum(vectors, rnd)
        up += sum(exchange.bytes_up.values())
        down += sum(exchange.bytes_down.values())
        return RoundTraffic({}, {}, up, down, Summed(exchange.total, exchange.survivors))


def reply_vector(reply: Message) -> np.ndarray:
    """What a client feeds secure aggregation: its reply's values, then its loss."""
    if not isinstance(reply, ScalarReply):
        raise TypeError(f"no secure aggregation of a {type(reply).__name__}")
    return np.append(reply.scalars.astype(np.float64).ravel(), reply.loss)
