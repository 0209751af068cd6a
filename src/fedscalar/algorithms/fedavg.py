"""FedAvg: K local first-order SGD steps per client, full weight delta uploaded.

The baseline whose bytes grow with the model: the server sends the d global weights and
each client sends back d floats. Its ledger records each round's lr only; its weights
are recovered from checkpoints, not replayed.
"""

from __future__ import annotations

import numpy as np
import torch

from fedscalar.algorithms.base import (
    Client,
    ClientData,
    RejectedReply,
    Server,
    check_finite,
    check_round,
    check_values,
)
from fedscalar.messages import DeltaReply, GlobalUpdate, Message, WeightsMessage, encode
from fedscalar.params import ParamSpace


class FedAvgClient(Client):
    def __init__(self, space: ParamSpace, local_steps: int):
        self.space, self.local_steps = space, local_steps

    def handle(self, messages: list[Message], data: ClientData) -> Message:
        (msg,) = messages
        if not isinstance(msg, WeightsMessage):
            raise TypeError(f"FedAvg client expected weights, got {type(msg).__name__}")
        start = torch.from_numpy(msg.values)
        self.space.load_flat_(start)
        first_loss = float("nan")
        for k in range(self.local_steps):
            batch = data.make_batch(msg.round, k)
            self.space.model.zero_grad(set_to_none=True)
            loss = data.loss(self.space.model, batch)
            loss.backward()
            with torch.no_grad():
                for p in self.space.params:
                    p.add_(p.grad, alpha=-msg.lr)
            if k == 0:
                first_loss = float(loss.detach())
        delta = (self.space.flat() - start).numpy()
        return DeltaReply(msg.round, first_loss, delta)


class FedAvgServer(Server):
    def __init__(self, space: ParamSpace):
        self.space = space
        self.global_weights = space.flat()
        self._round = 0

    @property
    def round(self) -> int:
        return self._round

    def messages_for(self, client_id, rnd, lr, seeds) -> list[Message]:
        return [WeightsMessage(rnd, lr, self.global_weights.numpy())]

    def max_reply_bytes(self, seeds):
        return len(encode(DeltaReply(0, 0.0, np.zeros(self.space.numel, np.float32))))

    def check_reply(self, rnd, seeds, reply) -> None:
        check_round(DeltaReply, rnd, reply)
        if reply.values.size != self.space.numel:
            raise RejectedReply(f"a delta of {reply.values.size} values for {self.space.numel}")
        check_values(reply.loss, reply.values)

    def aggregate(self, rnd, lr, seeds, replies):
        losses = []
        total = torch.zeros_like(self.global_weights, dtype=torch.float64)
        for reply in replies.values():
            total += torch.from_numpy(reply.values)
            losses.append(reply.loss)
        new = (self.global_weights.double() + total / len(replies)).float()
        check_finite("the updated weights", rnd, float(new.sum()))
        self.global_weights = new
        self.space.load_flat_(new)
        self._round = rnd
        return GlobalUpdate(rnd, float(np.float32(lr)), (), np.zeros((0, 0), np.float32)), float(
            np.mean(losses)
        )

    def skip(self, rnd, seeds) -> GlobalUpdate:
        self._round = rnd
        return GlobalUpdate(rnd, 0.0, (), np.zeros((0, 0), np.float32))

    def apply(self, update: GlobalUpdate) -> None:
        raise NotImplementedError("FedAvg updates are not replayable; resume from a checkpoint")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.space.state()

    def load_state_tensors(self, tensors, rnd) -> None:
        self.space.load_state_(tensors)
        self.global_weights = self.space.flat()
        self._round = rnd
