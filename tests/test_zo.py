"""The ZO estimator and perturbation mechanics against analytic values."""

import numpy as np
import pytest
import torch
from torch import nn

from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.params import ParamSpace
from tests import reference


class Quadratic(nn.Module):
    """f(x) = 0.5 x^T A x + b^T x over two parameter tensors."""

    def __init__(self, d1=40, d2=24):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x1 = nn.Parameter(torch.randn(d1, generator=g, dtype=torch.float64))
        self.x2 = nn.Parameter(torch.randn(d2, generator=g, dtype=torch.float64))
        m = torch.randn(d1 + d2, d1 + d2, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / (d1 + d2))
        self.register_buffer("b", torch.randn(d1 + d2, generator=g, dtype=torch.float64))

    def forward(self, _batch=None):
        x = torch.cat([self.x1, self.x2])
        return 0.5 * x @ self.A @ x + self.b @ x


def _data():
    return ClientData(0, lambda r, k: None, lambda model, batch: model(batch))


def _direction(seed, p, model):
    return torch.cat(
        [
            torch.from_numpy(reference.rademacher(seed, p, i, q.numel())).double()
            for i, q in enumerate([model.x1, model.x2])
        ]
    )


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_estimate_on_quadratic_matches_analytic_derivative(difference):
    model = Quadratic()
    mu = 1e-3
    algo = ZOAlgorithm(ZOSettings(perturbations=4, mu=mu, difference=difference))
    state = ZOState(ParamSpace(model), hiso=False)
    loss, g = algo.measure(state, _data(), None, seed=77, local=[])
    x = torch.cat([model.x1, model.x2]).detach()
    grad = model.A @ x + model.b
    # forward: the loss at x; central: the mean of f(x +- mu z), within O(mu^2) of it
    assert loss == pytest.approx(
        float(model().detach()), rel=1e-12 if difference == "forward" else 1e-5
    )
    for p in range(4):
        z = _direction(77, p, model)
        exact = float(grad @ z)
        if difference == "forward":  # f(x+mu z)-f(x) / mu = grad.z + mu/2 z^T A z exactly
            exact += mu / 2 * float(z @ model.A @ z)
        assert g[p] == pytest.approx(exact, rel=1e-6, abs=1e-6)


def test_perturbed_forward_sees_x_plus_mu_z_and_leaves_weights_untouched():
    model = Quadratic()
    space = ParamSpace(model)
    before = [p.detach().clone() for p in space.params]
    with torch.no_grad(), space.perturbed([(5, 0, 0.1), (6, 1, -0.2)]):
        value = float(model())
    x = torch.cat(before) + 0.1 * _direction(5, 0, model) - 0.2 * _direction(6, 1, model)
    assert value == pytest.approx(float(0.5 * x @ model.A @ x + model.b @ x), rel=1e-12)
    for p, q in zip(before, space.params, strict=True):
        assert torch.equal(p, q)  # bit-identical: perturbation never writes the weights


def test_parameter_used_outside_its_module_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return x @ self.inner.weight  # bypasses inner.forward

    model = Sneaky()
    space = ParamSpace(model)
    with pytest.raises(RuntimeError, match="outside their module"), space.perturbed([(1, 0, 0.1)]):
        model(torch.ones(1, 3))


def test_hiso_update_matches_formula():
    """x <- x - lr D, H <- beta H + (1-beta) D^2 with D = (1/P) sum_p g_p z_p / sqrt(H + eps)."""
    from fedscalar.messages import GlobalUpdate

    model = Quadratic(d1=50, d2=30)
    algo = ZOAlgorithm(ZOSettings(perturbations=3, hiso=True, beta=0.9, eps=1e-8))
    state = ZOState(ParamSpace(model), hiso=True)
    x0 = torch.cat([model.x1, model.x2]).detach().clone()
    h0 = torch.rand(80, dtype=torch.float64) + 0.5
    state.curvature[0].copy_(h0[:50].float())
    state.curvature[1].copy_(h0[50:].float())
    g = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    algo.apply(state, GlobalUpdate(1, 0.01, (11,), g))
    h_old = torch.cat([c.clone() for c in (h0[:50].float(), h0[50:].float())]).double()
    zsum = sum(float(g[0, p]) / 3 * _direction(11, p, model) for p in range(3))
    d = zsum / torch.sqrt(h_old + 1e-8)
    torch.testing.assert_close(
        torch.cat([model.x1, model.x2]).detach(), x0 - 0.01 * d, rtol=0, atol=1e-6
    )
    h_new = torch.cat(state.curvature).double()
    torch.testing.assert_close(h_new, 0.9 * h_old + 0.1 * d * d, rtol=1e-5, atol=1e-7)
    assert state.round == 1
