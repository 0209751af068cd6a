"""Differential privacy: accounting against an independent formula, the mechanism, and
DP runs (secret kept out of the config, epsilon recorded, resume bit-exact, bad input)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from fedscalar import RunConfig, run
from fedscalar.cli import app
from fedscalar.config import ConfigError
from fedscalar.export import rebuild
from fedscalar.privacy.accounting import BudgetError, Federation
from fedscalar.privacy.dp import GaussianDP
from fedscalar.rundir import RunDir

SMALL = dict(task="digits", clients=4, sampled=2, eval_every=5, batch_size=16, lr=0.03)


def _gdp_delta(epsilon: float, mu: float) -> float:
    """Exact delta(epsilon) of a mu-GDP mechanism (Dong, Roth and Su 2019, Cor. 2.13)."""
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


@pytest.mark.parametrize(
    "epsilon,delta,rounds", [(1.0, 1e-5, 1), (3.0, 1e-5, 100), (8.0, 1e-6, 1000)]
)
def test_calibration_matches_the_exact_gaussian_composition(epsilon, delta, rounds):
    # Every round in full (local mode): T Gaussian mechanisms of noise multiplier z
    # compose to exactly sqrt(T)/z-GDP, whose delta(epsilon) has a closed form. RDP is an
    # upper bound, so the calibrated noise must meet the budget exactly and be at most
    # ~10% above the exact minimum (RDP's conversion slack at these budgets: 6-9%).
    z = Federation("local", 10, 10).calibrate(epsilon, delta, rounds)
    exact = brentq(lambda s: _gdp_delta(epsilon, math.sqrt(rounds) / s) - delta, 0.01, 1e4)
    assert _gdp_delta(epsilon, math.sqrt(rounds) / z) <= delta
    assert exact <= z <= 1.12 * exact


def test_sampling_amplifies_and_the_budget_is_spent_exactly():
    full = Federation("central", 10, 10)
    sampled = Federation("central", 100, 10)
    z_full = full.calibrate(3.0, 1e-5, 200)
    z_sampled = sampled.calibrate(3.0, 1e-5, 200)
    assert z_sampled < z_full / 2  # a client takes part in 1 round of 10
    spending = sampled.spending(z_sampled)
    assert spending.epsilon(200, 1e-5) == pytest.approx(3.0, rel=1e-3)
    per_round = [spending.epsilon(t, 1e-5) for t in (1, 50, 100, 200)]
    assert per_round == sorted(per_round) and per_round[-1] <= 3.0 * (1 + 1e-6)
    assert spending.epsilon(0, 1e-5) == 0.0


def test_a_budget_needing_too_much_noise_is_refused():
    with pytest.raises(BudgetError, match="noise multiplier above"):
        Federation("local", 4, 4).calibrate(1e-4, 1e-10, 10_000)


def test_clipping_scales_long_replies_only():
    dp = GaussianDP("central", clip=2.0, noise_multiplier=1.0, secret=7)
    long = np.array([3.0, 4.0])  # norm 5
    assert np.allclose(dp.clipped(long), long * 2.0 / 5.0)
    short = np.array([0.3, -0.4])
    assert np.array_equal(dp.clipped(short), short)


def test_central_noise_has_the_stated_spread_and_replays():
    dp = GaussianDP("central", clip=1.0, noise_multiplier=1.5, secret=123)
    rows = np.zeros((5, 4))
    draws = np.stack([dp.private_mean(rows, rnd) for rnd in range(4000)])
    # the sum is noised once with std z * 2 * clip, then divided by the 5 replies
    assert draws.std() == pytest.approx(1.5 * 2.0 / 5, rel=0.03)
    assert abs(draws.mean()) < 0.02
    assert np.array_equal(dp.private_mean(rows, 17), dp.private_mean(rows, 17))
    other = GaussianDP("central", clip=1.0, noise_multiplier=1.5, secret=124)
    assert not np.array_equal(dp.private_mean(rows, 17), other.private_mean(rows, 17))
    signal = np.array([[3.0, 4.0, 0.0, 0.0]] * 5)  # clipped to norm 1 before the mean
    quiet = GaussianDP("central", clip=1.0, noise_multiplier=1e-9, secret=1)
    assert np.allclose(quiet.private_mean(signal, 0), [0.6, 0.8, 0.0, 0.0])


def test_local_noise_differs_per_client_and_round():
    dp = GaussianDP("local", clip=1.0, noise_multiplier=1.0, secret=5)
    row = np.zeros(3)
    a, b, c = dp.private_row(row, 1, 0), dp.private_row(row, 1, 1), dp.private_row(row, 2, 0)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, dp.private_row(row, 1, 0))


def _weights(path):
    tensors, meta = RunDir.load_tensors(RunDir(path).checkpoint)
    return tensors, int(meta["round"])


@pytest.mark.parametrize(
    "algorithm,mode", [("decomfl", "central"), ("fedavg", "central"), ("hiso", "local")]
)
def test_a_private_run_resumes_bit_exact_and_keeps_its_secret(tmp_path, algorithm, mode):
    lr = 0.1 if algorithm == "fedavg" else 0.03
    noise = 0.01 if algorithm == "fedavg" else 0.5  # FedAvg noises all 2,410 weights
    dp = dict(dp_noise_multiplier=noise, dp_clip=1.0, dp_mode=mode)
    opts = {**SMALL, "lr": lr, **dp}
    full, part = tmp_path / "full", tmp_path / "part"
    run(RunConfig(algorithm=algorithm, rounds=10, out=str(full), **opts))
    run(RunConfig(algorithm=algorithm, rounds=4, out=str(part), **opts))
    run(resume=True, resume_overrides={"out": str(part), "rounds": 10})
    # the two runs draw different secrets: their noise differs, so their weights do
    a, _ = _weights(full)
    b, _ = _weights(part)
    assert any(not torch.equal(a[n], b[n]) for n in a)
    # ... but a run resumed from its own folder is bit-exact to its own export
    weights, rounds = rebuild(part)
    assert rounds == 10 and all(torch.equal(weights[n], b[n]) for n in weights)
    assert "dp_seed" not in (part / "config.toml").read_text()
    secret = part / "dp-secret"
    assert secret.exists() and secret.stat().st_mode & 0o077 == 0
    metrics = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    spent = [m["dp_epsilon"] for m in metrics if m["round"] > 0]
    assert len(spent) == 10 and spent == sorted(spent)
    # under local DP the server never learns a client's loss: none is reported
    trained = metrics[1:]
    if mode == "local":
        assert all("train_loss" not in m for m in trained)
    else:
        assert all(m["train_loss"] > 0 for m in trained)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["dp_epsilon_spent"] == pytest.approx(spent[-1])
    assert summary["dp_mode"] == mode and summary["dp_noise_multiplier"] == noise


def test_a_private_run_with_a_given_seed_is_reproduced_by_resume(tmp_path):
    opts = {**SMALL, "dp_noise_multiplier": 0.5, "dp_seed": 99}
    full, part = tmp_path / "full", tmp_path / "part"
    run(RunConfig(algorithm="decomfl", rounds=9, out=str(full), **opts))
    run(RunConfig(algorithm="decomfl", rounds=4, out=str(part), **opts))
    run(resume=True, resume_overrides={"out": str(part), "rounds": 9})
    a, _ = _weights(full)
    b, _ = _weights(part)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (full / "ledger.bin").read_bytes() == (part / "ledger.bin").read_bytes()
    plain = tmp_path / "plain"
    run(RunConfig(algorithm="decomfl", rounds=9, out=str(plain), **SMALL))
    c, _ = _weights(plain)
    assert any(not torch.equal(a[n], c[n]) for n in a)  # the noise was applied


def test_the_budget_is_calibrated_and_cannot_be_extended(tmp_path):
    out = tmp_path / "r"
    cfg = RunConfig(algorithm="decomfl", rounds=6, out=str(out), dp_epsilon=8.0, **SMALL)
    cfg = cfg.model_copy(update={"sampled": 4})  # every client every round: fast accounting
    run(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp_epsilon_spent"] == pytest.approx(8.0, rel=1e-3)
    assert summary["dp_noise_multiplier"] == pytest.approx(
        Federation("central", 4, 4).calibrate(8.0, 1e-5, 6)
    )
    result = CliRunner().invoke(app, ["run", "--resume", "--out", str(out), "--rounds", "12"])
    assert result.exit_code == 2
    assert "over the budget" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,field",
    [
        (["--dp-epsilon", "0"], "dp_epsilon"),
        (["--dp-epsilon", "-1"], "dp_epsilon"),
        (["--dp-epsilon", "3", "--dp-delta", "1"], "dp_delta"),
        (["--dp-epsilon", "3", "--dp-delta", "0"], "dp_delta"),
        (["--dp-epsilon", "3", "--dp-clip", "0"], "dp_clip"),
        (["--dp-clip", "2"], "only with --dp-epsilon"),
        (["--dp-epsilon", "3", "--algorithm", "feedsign"], "differential privacy covers"),
        (["--dp-epsilon", "3", "--aggregator", "median"], "mean only"),
        (
            ["--dp-epsilon", "1e-4", "--dp-delta", "1e-10", "--rounds", "10000", "--sampled", "10"],
            "noise multiplier above",
        ),
    ],
)
def test_bad_privacy_options_exit_2_with_one_line(tmp_path, args, field):
    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.output
    assert not (out / "ledger.bin").exists()


def test_resolving_a_config_raises_a_config_error_for_an_impossible_budget():
    cfg = RunConfig(task="digits", dp_epsilon=1e-4, dp_delta=1e-10, rounds=10_000, sampled=10)
    with pytest.raises(ConfigError, match="noise multiplier above"):
        cfg.resolved()


def test_compare_over_budgets_tabulates_accuracy_against_epsilon(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--task", "digits", "--algorithms", "decomfl"]
    args += ["--dp-epsilon", "8,none", "--rounds", "4", "--eval-every", "2", "--clients", "4"]
    args += ["--sampled", "4", "--dp-clip", "0.5", "--divergence-ratio", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (out / "privacy.md").read_text()
    assert "| algorithm | epsilon 8 | no DP |" in table
    assert table.count("(z ") == 1 and (out / "privacy.png").stat().st_size > 0
    z = Federation("central", 4, 4).calibrate(8.0, 1e-5, 4)
    for algorithm in ("decomfl",):
        private = json.loads((out / f"epsilon-8/runs/{algorithm}/seed0/summary.json").read_text())
        assert private["dp_noise_multiplier"] == pytest.approx(z)
        assert private["dp_clip"] == 0.5
        plain = (out / f"epsilon-none/runs/{algorithm}/seed0/config.toml").read_text()
        assert "dp_epsilon" not in plain and "dp_clip = 1.0" in plain  # DP options dropped
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("finished earlier, skipped") == 2
    wider = [a if a != "8,none" else "3,8,none" for a in args]  # budget 3 never started
    report = CliRunner().invoke(app, [*wider, "--report-only"])
    assert report.exit_code == 0, report.output
    assert "nothing trained" in report.output and not (out / "epsilon-3").exists()
    assert "| algorithm | epsilon 8 | no DP |" in (out / "privacy.md").read_text()


@pytest.mark.parametrize(
    "budgets,message", [("0,3", "positive"), ("3,abc", "not a number"), ("3,3", "distinct")]
)
def test_bad_budget_lists_exit_2_with_one_line(tmp_path, budgets, message):
    args = ["compare", "--out", str(tmp_path / "c"), "--task", "digits"]
    result = CliRunner().invoke(app, [*args, "--algorithms", "decomfl", "--dp-epsilon", budgets])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
