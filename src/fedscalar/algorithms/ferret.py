"""Ferret (arXiv 2409.06277): first-order local steps, uploaded as R random projections.

A sampled client takes K local SGD steps from the global weights x (``request.lr``),
giving its update ``delta = x_K - x``, and uploads the R coefficients
``c_r = <delta, z_r>`` along the round's shared directions ``z_r = z(seed, r)`` (the
project's Rademacher generator, produced chunk by chunk, never as a d x R matrix). The
server averages the coefficients (or combines them with a robust rule); every party
rebuilds the update from the seed and the averaged coefficients:

    x <- x + server_lr * (1/R) sum_r cbar_r z_r

Because ``E[z z^T] = I`` the rebuilt update is unbiased, ``E[(1/R) sum_r <d, z_r> z_r]
= d``, with squared error ``(d - 1)/R * |delta|^2`` for a d-dimensional update (less
the squared entries' share; tests/test_ferret.py measures it). The round's ledger entry
is DeComFL's: one seed, and the R values ``-cbar_r`` at rate ``server_lr``, so the
update is replayed by `ZOAlgorithm.apply`, bit-identical on every party, and resume and
export are DeComFL's. Ferret's code groups parameters into blocks, each with its own
share of the coefficients; here the R directions span all trainable weights at once.

Cost per client round: K forward and backward passes, one copy of the trainable weights
(the start point), their gradients, and R directions generated over d weights.
"""

from __future__ import annotations

import numpy as np
import torch

from fedscalar import directions
from fedscalar.algorithms.aggregators import aggregate
from fedscalar.algorithms.zo import ProtocolError, ZOAlgorithm, ZOServer, ZOSettings, ZOState
from fedscalar.messages import GlobalUpdate, ScalarReply, TrainRequest
from fedscalar.params import ParamSpace

PROJECT_BLOCK = 1 << 22
"""Direction entries generated at a time while projecting (R rows x a slice): 32 MB."""


def project(
    params: list[torch.Tensor], delta: list[torch.Tensor], seed: int, count: int
) -> np.ndarray:
    """``<delta, z(seed, r)>`` for r < ``count``, in float64, a block of rows at a time."""
    out = torch.zeros(count, dtype=torch.float64)
    width = max(32, (PROJECT_BLOCK // count) // 32 * 32)
    for i, (p, d) in enumerate(zip(params, delta, strict=True)):
        flat = d.reshape(-1).double()
        for start, stop in directions.chunks(p.numel(), width):
            z = directions.rademacher_rows(
                seed, count, i, start, stop, device=p.device, dtype=torch.float64
            )
            out += (z @ flat[start:stop]).cpu()
    return out.numpy()


class FerretAlgorithm(ZOAlgorithm):
    """Ferret's client step; its global update is applied as DeComFL's (`apply`)."""

    def __init__(self, settings: ZOSettings, local_steps: int):
        super().__init__(settings)
        self.name, self.local_sgd_steps = "ferret", local_steps

    @property
    def projections(self) -> int:
        return self.s.perturbations

    def train(self, state: ZOState, request: TrainRequest, data) -> ScalarReply:
        """K SGD steps from the global point, projected; the replica is left unchanged."""
        if state.round != request.round - 1:
            raise ProtocolError(
                f"client at round {state.round} asked to train round {request.round}: "
                "catch-up missing"
            )
        space: ParamSpace = state.space
        start = [p.detach().clone() for p in space.params]
        first_loss = float("nan")
        try:
            for k in range(self.local_sgd_steps):
                batch = data.make_batch(request.round, k)
                space.model.zero_grad(set_to_none=True)
                loss = data.loss(space.model, batch)
                loss.backward()
                with torch.no_grad():
                    for p in space.params:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-request.lr)
                if k == 0:
                    first_loss = float(loss.detach())
            with torch.no_grad():
                delta = [p.detach() - s for p, s in zip(space.params, start, strict=True)]
            coeffs = project(space.params, delta, request.seeds[0], self.projections)
        finally:
            space.model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, s in zip(space.params, start, strict=True):
                    p.copy_(s)
        return ScalarReply(request.round, first_loss, coeffs.astype(np.float32)[None, :])


class FerretServer(ZOServer):
    """Combines the clients' coefficients; the update is ``-cbar`` at ``server_lr``."""

    def __init__(self, algo: FerretAlgorithm, state, history, server_lr: float, **kwargs):
        super().__init__(algo, state, history, **kwargs)
        self.server_lr = server_lr

    def _shape(self, seeds):
        return 1, self.algo.s.perturbations

    def messages_for(self, client_id, rnd, lr, seeds):
        return super().messages_for(client_id, rnd, lr, tuple(seeds[:1]))

    def aggregate(self, rnd, lr, seeds, replies):
        cids = sorted(replies)
        rows = np.stack([replies[c].scalars.astype(np.float64).reshape(-1) for c in cids])
        cbar = aggregate(rows, self.aggregator, self.trim_fraction, self.krum_f)
        scalars = (-cbar).astype(np.float32).reshape(self._shape(seeds))
        update = GlobalUpdate(rnd, float(np.float32(self.server_lr)), (seeds[0],), scalars)
        self._commit(update, cids)
        return update, float(np.mean([replies[c].loss for c in cids]))

    def skip(self, rnd, seeds) -> GlobalUpdate:
        update = GlobalUpdate(rnd, 0.0, (seeds[0],), np.zeros(self._shape(seeds), np.float32))
        self.apply(update)
        return update
