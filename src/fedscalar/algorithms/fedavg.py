"""The FedAvg family: clients upload a whole weight change, the server averages them.

- ``fedavg``: K local first-order SGD steps, the dense change uploaded.
- ``fedavg-topk`` / ``fedavg-qsgd``: the same, the upload compressed with error feedback
  (`fedscalar.algorithms.compression`).
- ``fedzo`` (Fang et al. 2022): K local *zeroth-order* steps (the estimator of DESIGN.md
  2.1, along directions private to the client), the dense change uploaded. Same
  estimator as DeComFL, bytes that grow with the model.

The server sends the d global weights and gets back d values (or their compressed form)
per client. Its ledger records each round's lr only; its weights are recovered from
checkpoints, not replayed.
"""

from __future__ import annotations

import numpy as np
import torch

from fedscalar import schedule
from fedscalar.algorithms.aggregators import combine
from fedscalar.algorithms.base import (
    Client,
    ClientData,
    RejectedReply,
    Server,
    check_finite,
    check_round,
    check_values,
)
from fedscalar.algorithms.compression import Compressor, dense
from fedscalar.algorithms.zo import ZOAlgorithm, ZOState
from fedscalar.messages import GlobalUpdate, Message, TrainRequest, WeightsMessage
from fedscalar.params import ParamSpace
from fedscalar.privacy.dp import GaussianDP


class FedAvgClient(Client):
    """Local steps from the global weights; replies with the (compressed) weight change.

    With error feedback each client id keeps a residual vector: client memory that a
    real client holds anyway; the simulator keeps one per client that has taken part.
    """

    def __init__(
        self,
        space: ParamSpace,
        local_steps: int,
        compressor: Compressor | None = None,
        zo: ZOAlgorithm | None = None,
        run_seed: int = 0,
    ):
        self.space, self.local_steps = space, local_steps
        self.compressor = compressor or Compressor()
        self.zo, self.run_seed = zo, run_seed
        self.residuals: dict[int, np.ndarray] = {}

    def _sgd(self, msg: WeightsMessage, data: ClientData) -> float:
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
        return first_loss

    def _zo(self, msg: WeightsMessage, data: ClientData) -> float:
        assert self.zo is not None
        seeds = schedule.client_seeds(self.run_seed, msg.round, data.client_id, self.local_steps)
        state = ZOState(self.space, hiso=False)
        state.round = msg.round - 1
        reply = self.zo.train(state, TrainRequest(msg.round, msg.lr, seeds), data)
        self.zo.apply(state, GlobalUpdate(msg.round, msg.lr, seeds, reply.scalars))
        return reply.loss

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"residual::{c}": torch.from_numpy(r) for c, r in self.residuals.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.residuals = {
            int(k.split("::", 1)[1]): v.numpy().copy()
            for k, v in tensors.items()
            if k.startswith("residual::")
        }

    def handle(self, messages: list[Message], data: ClientData) -> Message:
        (msg,) = messages
        if not isinstance(msg, WeightsMessage):
            raise TypeError(f"FedAvg client expected weights, got {type(msg).__name__}")
        start = torch.from_numpy(msg.values)
        self.space.load_flat_(start)
        loss = self._zo(msg, data) if self.zo is not None else self._sgd(msg, data)
        delta = (self.space.flat() - start).numpy()
        if self.compressor.name == "none":
            return self.compressor.compress(msg.round, loss, delta, None)
        v = delta + self.residuals.get(data.client_id, 0.0)
        rng = schedule.rng_for(self.run_seed, schedule.COMPRESS, msg.round, data.client_id)
        reply = self.compressor.compress(msg.round, loss, v.astype(np.float32), rng)
        self.residuals[data.client_id] = (v - dense(reply, v.size)).astype(np.float32)
        return reply


class FedAvgServer(Server):
    def __init__(
        self,
        space: ParamSpace,
        compressor: Compressor | None = None,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        krum_f: int | None = None,
        dp: GaussianDP | None = None,
    ):
        self.space = space
        self.compressor = compressor or Compressor()
        self.aggregator, self.trim_fraction, self.krum_f = aggregator, trim_fraction, krum_f
        self.dp = dp  # central DP: the server clips and noises the changes' sum
        self.global_weights = space.flat()
        self._round = 0

    @property
    def round(self) -> int:
        return self._round

    def messages_for(self, client_id, rnd, lr, seeds) -> list[Message]:
        return [WeightsMessage(rnd, lr, self.global_weights.numpy())]

    def max_reply_bytes(self, seeds):
        return self.compressor.max_bytes(self.space.numel)

    def check_reply(self, rnd, seeds, reply) -> None:
        check_round(self.compressor.reply_type(), rnd, reply)
        try:
            values = dense(reply, self.space.numel)
        except ValueError as e:
            raise RejectedReply(str(e)) from None
        check_values(reply.loss, values)

    def aggregate(self, rnd, lr, seeds, replies):
        cids = sorted(replies)
        rows = np.stack([dense(replies[c], self.space.numel) for c in cids])
        change = combine(rows, rnd, self.aggregator, self.trim_fraction, self.krum_f, self.dp)
        new = (self.global_weights.double() + torch.from_numpy(change)).float()
        check_finite("the updated weights", rnd, float(new.sum()))
        self.global_weights = new
        self.space.load_flat_(new)
        self._round = rnd
        loss = float(np.mean([replies[c].loss for c in cids]))
        return GlobalUpdate(rnd, float(np.float32(lr)), (), np.zeros((0, 0), np.float32)), loss

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
