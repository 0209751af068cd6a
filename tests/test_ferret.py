"""Ferret: first-order local steps, projected on shared directions, rebuilt by replay."""

import numpy as np
import pytest
import torch
from torch import nn

from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.ferret import FerretAlgorithm, FerretServer, project
from fedscalar.algorithms.zo import ZOAlgorithm, ZOClient, ZOSettings, ZOState
from fedscalar.config import ConfigError, build_config
from fedscalar.messages import CatchUp, GlobalUpdate, ScalarReply, decode, encode
from fedscalar.params import ParamSpace
from tests import reference


class Quadratic(nn.Module):
    """f_c(x) = 0.5 |x - t_c|^2 over two parameter tensors."""

    def __init__(self, d1=24, d2=16):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(d1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(d2, dtype=torch.float64))

    def forward(self, target):
        return 0.5 * ((torch.cat([self.a, self.b]) - target) ** 2).sum()


def _data(cid, target):
    return ClientData(cid, lambda r, k: target, lambda model, batch: model(batch))


def _z(seed, r, sizes):
    return torch.cat(
        [
            torch.from_numpy(reference.rademacher(seed, r, i, n)).double()
            for i, n in enumerate(sizes)
        ]
    )


def test_projection_matches_the_reference_directions():
    params = [torch.zeros(70), torch.zeros(33)]
    g = torch.Generator().manual_seed(1)
    delta = [torch.randn(70, generator=g), torch.randn(33, generator=g)]
    got = project(params, delta, seed=123, count=5)
    flat = torch.cat(delta).double()
    want = [float(flat @ _z(123, r, (70, 33))) for r in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_rebuilt_update_is_unbiased_with_the_predicted_error():
    """(1/R) sum_r <d, z_r> z_r, with Rademacher z: mean d, squared error (n-1)/R |d|^2."""
    n, r_count, draws = 40, 8, 400
    model = Quadratic()
    space = ParamSpace(model)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    parts = [delta[:24], delta[24:]]
    errors, mean = [], torch.zeros(n, dtype=torch.float64)
    for seed in range(draws):
        c = project(space.params, parts, seed, r_count)
        rebuilt = sum(c[r] * _z(seed, r, (24, 16)) for r in range(r_count)) / r_count
        errors.append(float(((rebuilt - delta) ** 2).sum() / (delta**2).sum()))
        mean += rebuilt / draws
    assert np.mean(errors) == pytest.approx((n - 1) / r_count, rel=0.1)
    # the mean of 400 draws: relative squared error (n-1)/(R * draws) ~ 0.012 expected
    assert float(((mean - delta) ** 2).sum() / (delta**2).sum()) < 0.05


def test_two_clients_two_rounds_by_hand():
    """K=2 SGD steps per client, R=6 coefficients each, the mean rebuilt by every party."""
    sizes, lr, slr, r_count = (24, 16), 0.25, 0.5, 6
    g = torch.Generator().manual_seed(4)
    targets = {c: torch.randn(40, generator=g, dtype=torch.float64) for c in (0, 1)}
    settings = ZOSettings(perturbations=r_count)
    history: list[GlobalUpdate] = []
    server_model = Quadratic()
    server = FerretServer(
        FerretAlgorithm(settings, 2), ZOState(ParamSpace(server_model), False), history, slr
    )
    models = {c: Quadratic() for c in (0, 1, 2)}
    clients = {
        c: ZOClient(FerretAlgorithm(settings, 2), ZOState(ParamSpace(m), False))
        for c, m in models.items()
    }
    x = torch.zeros(40, dtype=torch.float64)
    for rnd, seed in ((1, 11), (2, 22)):
        replies, coeffs = {}, []
        for cid in (0, 1):
            msgs = server.messages_for(cid, rnd, lr, (seed,))
            reply = decode(encode(clients[cid].handle(msgs, _data(cid, targets[cid]))))
            assert isinstance(reply, ScalarReply) and reply.scalars.shape == (1, r_count)
            y = x.clone()  # two gradient steps on 0.5|y - t|^2 by hand
            for _ in range(2):
                y = y - lr * (y - targets[cid])
            want = [float((y - x) @ _z(seed, r, sizes)) for r in range(r_count)]
            np.testing.assert_allclose(reply.scalars[0], want, rtol=1e-6)
            assert reply.loss == pytest.approx(float(0.5 * ((x - targets[cid]) ** 2).sum()))
            replies[cid] = reply
            coeffs.append(reply.scalars[0].astype(np.float64))
        update, _ = server.aggregate(rnd, lr, (seed,), replies)
        history.append(update)
        cbar = np.float32(-(coeffs[0] + coeffs[1]) / 2).astype(np.float64)  # as recorded
        np.testing.assert_array_equal(update.scalars[0], np.float32(cbar))
        x = x - float(np.float32(slr)) * sum(
            cbar[r] / r_count * _z(seed, r, sizes) for r in range(r_count)
        )
        got = torch.cat([server_model.a, server_model.b]).detach()
        torch.testing.assert_close(got, x, rtol=0, atol=1e-6)  # the protocol sums in float32
        for cid in (0, 1):  # training left each replica at the round's start point
            assert models[cid].a.grad is None
    msgs = server.messages_for(2, 3, lr, (33,))
    assert isinstance(msgs[0], CatchUp) and len(msgs[0].updates) == 2
    clients[2].replay(decode(encode(msgs[0])).updates)
    for name in ("a", "b"):
        assert torch.equal(getattr(models[2], name), getattr(server_model, name))


def test_the_update_is_replayed_by_the_decomfl_rule():
    """A Ferret ledger entry is an ordinary global update: ZOAlgorithm.apply rebuilds it."""
    model, twin = Quadratic(), Quadratic()
    ferret = FerretAlgorithm(ZOSettings(perturbations=4), 1)
    update = GlobalUpdate(1, 0.5, (9,), np.array([[0.5, -1.0, 2.0, 0.25]], np.float32))
    ferret.apply(ZOState(ParamSpace(model), False), update)
    ZOAlgorithm(ZOSettings(perturbations=4)).apply(ZOState(ParamSpace(twin), False), update)
    assert torch.equal(model.a, twin.a) and torch.equal(model.b, twin.b)


def test_defaults_and_bad_options():
    cfg = build_config(algorithm="ferret")
    assert (cfg.projections, cfg.server_lr, cfg.effective_lr) == (64, 0.3, 0.3)
    assert build_config(algorithm="ferret", projections=200, server_lr=0.5).projections == 200
    with pytest.raises(ConfigError, match="projections: only for ferret, not decomfl"):
        build_config(algorithm="decomfl", projections=8)
    with pytest.raises(ConfigError, match="server_lr: only for ferret, not fedavg"):
        build_config(algorithm="fedavg", server_lr=0.5)
    with pytest.raises(ConfigError, match="projections"):
        build_config(algorithm="ferret", projections=256)
