"""The baselines on cases small enough to compute by hand (NumPy, reference directions)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedscalar import schedule
from fedscalar.algorithms import make_client, make_server
from fedscalar.algorithms.attacks import ByzantineClient, corrupt
from fedscalar.algorithms.base import ClientData
from fedscalar.algorithms.compression import QSGD, TopK, dense
from fedscalar.algorithms.fedavg import FedAvgClient, FedAvgServer
from fedscalar.algorithms.fedkseed import FedKSeedClient, probabilities
from fedscalar.algorithms.zo import ZOAlgorithm, ZOSettings, ZOState
from fedscalar.config import RunConfig
from fedscalar.messages import (
    CatchUp,
    DeltaReply,
    ScalarReply,
    SeedSync,
    decode,
    encode,
)
from fedscalar.params import ParamSpace
from fedscalar.runtime.local import LocalRuntime
from tests import reference

D = 6
B = [
    np.array([1.1, -2.0, 0.5, 3.0, -0.9, 0.25], np.float32),
    np.array([-0.5, 1.1, 2.0, -1.5, 0.7, 0.9], np.float32),
    np.array([2.0, 0.5, -1.0, 0.5, 1.5, -2.0], np.float32),
]
"""Client i's loss is the linear f_i(x) = B[i] . x: gradient B[i], exact finite differences."""


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.arange(D, dtype=torch.float32) / 10)

    def forward(self, b):
        return (self.x * b).sum()


def _data(cid: int) -> ClientData:
    b = torch.from_numpy(B[cid])
    return ClientData(cid, lambda r, k: b, lambda model, batch: model(batch))


def _z(seed: int, p: int = 0) -> np.ndarray:
    return reference.rademacher(seed, p, 0, D).astype(np.float64)


def _exchange(server, client, rnd, lr, seeds, cids):
    runtime = LocalRuntime(server, client, _data)
    traffic = runtime.run_round(rnd, lr, seeds, cids)
    replies = {c: server.accept(rnd, seeds, w) for c, w in traffic.replies.items()}
    update, _ = server.aggregate(rnd, lr, seeds, replies)
    if hasattr(server, "history"):
        server.history.append(update)  # the ledger's job in a run
    return traffic


def _cfg(algorithm, **kw):
    one = {"perturbations": 1} if RunConfig(algorithm=algorithm).spec.perturbs else {}
    return RunConfig(algorithm=algorithm, clients=3, sampled=2, **one, **kw)


def test_fedzo_two_clients_one_round_by_hand():
    cfg = _cfg("fedzo", mu=1e-2)
    space = ParamSpace(Linear())
    x0 = space.flat().double().numpy()
    server, client = make_server(cfg, space, []), make_client(cfg, space)
    lr = 0.1
    traffic = _exchange(server, client, 1, lr, (7,), [0, 1])
    expected = x0.copy()
    for cid in (0, 1):
        (seed,) = schedule.client_seeds(cfg.seed, 1, cid, 1)  # each client its own direction
        z = _z(seed)
        g = B[cid].astype(np.float64) @ z  # exact for a linear loss
        expected += -lr * g * z / 2
    np.testing.assert_allclose(server.global_weights.double().numpy(), expected, atol=1e-6)
    # O(d) both ways: the dense weights down and the dense change up.
    assert traffic.bytes_up == 2 * (13 + 4 * D)
    assert traffic.bytes_down == 2 * (13 + 4 * D)


def test_fedavg_topk_error_feedback_two_clients_two_rounds_by_hand():
    cfg = _cfg("fedavg-topk", topk_fraction=0.2)  # ceil(0.2 * 6) = 2 entries
    space = ParamSpace(Linear())
    x = space.flat().double().numpy()
    server, client = make_server(cfg, space, []), make_client(cfg, space)
    lr = 0.1
    residual = {0: np.zeros(D), 1: np.zeros(D)}
    for rnd in (1, 2):
        traffic = _exchange(server, client, rnd, lr, (1,), [0, 1])
        sent = []
        for cid in (0, 1):
            v = -lr * B[cid].astype(np.float64) + residual[cid]
            keep = np.sort(np.argsort(-np.abs(v))[:2])
            s = np.zeros(D)
            s[keep] = v[keep]
            residual[cid] = v - s
            sent.append(s)
        x = x + (sent[0] + sent[1]) / 2
        np.testing.assert_allclose(server.global_weights.double().numpy(), x, atol=1e-6)
        assert traffic.bytes_up == 2 * (17 + 8 * 2)
    for cid in (0, 1):
        np.testing.assert_allclose(client.residuals[cid], residual[cid], atol=1e-6)


def test_qsgd_error_feedback_loses_nothing():
    """Sum of what was sent + the final residual = sum of the true weight changes."""
    space = ParamSpace(Linear())
    client = FedAvgClient(space, 1, QSGD(2))  # 3 levels: coarse on purpose
    server = FedAvgServer(space, QSGD(2))
    sent, true = np.zeros(D), np.zeros(D)
    for rnd in range(1, 6):
        (msg,) = server.messages_for(0, rnd, 0.1, (1,))
        reply = decode(encode(client.handle([decode(encode(msg))], _data(0))))
        sent += dense(reply, D)
        true += -0.1 * B[0]
    np.testing.assert_allclose(sent + client.residuals[0], true, atol=1e-5)


def test_fedkseed_two_clients_two_rounds_by_hand_and_sync_reconstructs():
    cfg = _cfg("fedkseed", seed_pool=4, mu=0.1)  # linear loss: exact for any mu
    space = ParamSpace(Linear())
    x = space.flat().double().numpy()
    x0 = x.copy()
    server = make_server(cfg, space, [])
    client = make_client(cfg, space, server)  # the simulator's clients share its state
    pool = schedule.seed_pool(cfg.seed, 4)
    assert len(set(pool)) == 4
    lr = 0.05
    for rnd in (1, 2):
        seeds = schedule.round_seeds(cfg.seed, rnd, 1)
        traffic = _exchange(server, client, rnd, lr, seeds, [0, 2])
        step = np.zeros(D)
        for cid in (0, 2):
            j = schedule.pool_index(seeds[0], cid, 0, None, 4)
            z = _z(pool[j])
            step += (B[cid].astype(np.float64) @ z) * z
        x = x - lr * step / 2
        np.testing.assert_allclose(server.space.flat().double().numpy(), x, atol=1e-5)
        assert traffic.bytes_up == 2 * 19  # header 11, then (index, 1 scalar) per step
    # A client that missed both rounds rebuilds x from the accumulators, to float32 rounding.
    sync = server.sync_message(0, 2)
    assert isinstance(decode(encode(sync)), SeedSync)
    fresh_space = ParamSpace(Linear())
    fresh = FedKSeedClient(
        ZOAlgorithm(ZOSettings(perturbations=1)), ZOState(fresh_space, False), pool
    )
    fresh.sync(sync)
    np.testing.assert_allclose(
        fresh_space.flat().numpy(), server.space.flat().numpy(), rtol=1e-6, atol=1e-7
    )
    assert not np.allclose(x, x0)


def test_fedkseed_sync_is_bounded_by_the_pool_where_replay_grows():
    cfg = RunConfig(algorithm="fedkseed", clients=3, sampled=2, perturbations=2, seed_pool=3)
    space = ParamSpace(Linear())
    server = make_server(cfg, space, [])
    client = make_client(cfg, space, server)
    for rnd in range(1, 41):
        _exchange(server, client, rnd, 0.01, schedule.round_seeds(0, rnd, 1), [0, 1])
    sync = encode(server.sync_message(0, 40))
    replay = encode(CatchUp(tuple(server.history)))
    assert len(sync) <= 13 + 8 * 3 * 2  # at most pool x P keys, however many rounds
    assert len(replay) > 10 * len(sync)


def test_fedkseed_pro_probabilities_by_hand():
    p = probabilities(np.array([2.0, 0.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0]))
    e = math.e
    # scores [2, 2 (unseen: highest seen), 1, 2] -> normalised [1, 1, 0, 1] -> softmax
    np.testing.assert_allclose(p, [e, e, 1, e] / np.float64(3 * e + 1), rtol=1e-6)
    np.testing.assert_allclose(probabilities(np.zeros(4), np.zeros(4)), [0.25] * 4)


def test_mezo_is_one_party_on_the_pooled_data(tmp_path):
    from fedscalar.api import run
    from fedscalar.federation import batch_size, client_partitions
    from fedscalar.tasks import build_task

    cfg = RunConfig(algorithm="mezo", rounds=6, eval_every=3, out=str(tmp_path / "m"))
    task = build_task(cfg)
    (pooled,) = client_partitions(cfg, task)
    federated = client_partitions(cfg.model_copy(update={"algorithm": "decomfl"}), task)
    np.testing.assert_array_equal(pooled, np.sort(np.concatenate(federated)))
    assert batch_size(cfg) == cfg.batch_size * cfg.sampled
    summary = run(cfg).summary
    assert summary["bytes_up_total"] == summary["bytes_down_total"] == 0

    from fedscalar.export import rebuild
    from fedscalar.rundir import RunDir

    weights, rounds = rebuild(tmp_path / "m")
    checkpoint, _ = RunDir.load_tensors(RunDir(tmp_path / "m").checkpoint)
    assert rounds == 6
    for name, w in weights.items():
        assert torch.equal(w, checkpoint[name])


@pytest.mark.parametrize("attack", ["gaussian", "sign-flip"])
def test_byzantine_client_attacks_only_its_ids(attack):
    cfg = RunConfig(algorithm="decomfl", clients=3, sampled=3, perturbations=2)
    space = ParamSpace(Linear())
    server = make_server(cfg, space, [])
    honest = make_client(cfg, space, server)
    bad = ByzantineClient(make_client(cfg, space, server), frozenset({1}), attack, 4.0, 0)
    msgs = server.messages_for(0, 1, 0.1, (5,))
    for cid in (0, 1):
        want = honest.handle(msgs, _data(cid))
        got = bad.handle(msgs, _data(cid))
        decode(encode(got))  # still a well-formed reply
        if cid == 0:
            np.testing.assert_array_equal(got.scalars, want.scalars)
        elif attack == "sign-flip":
            np.testing.assert_allclose(got.scalars, -4.0 * want.scalars, rtol=1e-6)
        else:
            assert not np.allclose(got.scalars, want.scalars)
            assert got.round == want.round


def test_attacked_quantised_reply_stays_a_valid_quantised_reply():
    rng = np.random.default_rng(0)
    reply = QSGD(4).compress(3, 0.5, rng.normal(size=50).astype(np.float32), rng)
    flipped = corrupt(reply, "sign-flip", 1.0, rng)
    np.testing.assert_allclose(dense(flipped, 50), -dense(reply, 50), atol=1e-6)
    sparse = TopK(0.1).compress(1, 0.0, rng.normal(size=50).astype(np.float32), rng)
    attacked = corrupt(sparse, "gaussian", 2.0, rng)
    np.testing.assert_array_equal(attacked.indices, sparse.indices)
    assert isinstance(
        corrupt(DeltaReply(1, 0.0, np.ones(3, np.float32)), "gaussian", 1.0, rng), DeltaReply
    )


def test_median_aggregation_of_scalars_ignores_one_wild_client():
    cfg = RunConfig(algorithm="decomfl", clients=3, sampled=3, perturbations=2, aggregator="median")
    space = ParamSpace(Linear())
    server = make_server(cfg, space, [])
    rows = {0: [1.0, 2.0], 1: [1e6, -1e6], 2: [3.0, 4.0]}
    replies = {c: ScalarReply(1, 0.0, np.array([v], np.float32)) for c, v in rows.items()}
    update, _ = server.aggregate(1, 0.1, (9,), replies)
    np.testing.assert_array_equal(update.scalars, [[3.0, 2.0]])


@pytest.mark.parametrize(
    "algorithm", ["fedkseed", "fedkseed-pro", "fedzo", "fedavg-topk", "fedavg-qsgd", "mezo"]
)
def test_interrupted_baseline_resumes_to_the_same_model(tmp_path, algorithm):
    """Stopped at round 3 and resumed to 6 = 6 straight rounds, bit for bit (the
    checkpoint carries error-feedback residuals; Pro rebuilds its seed statistics)."""
    from fedscalar.api import run
    from fedscalar.export import rebuild
    from fedscalar.rundir import RunDir

    def cfg(rounds, out):
        return RunConfig(
            algorithm=algorithm, rounds=rounds, eval_every=3, seed_pool=16, out=str(out)
        )

    straight = run(cfg(6, tmp_path / "a")).out
    run(cfg(3, tmp_path / "b"))
    resumed = run(resume=True, resume_overrides={"out": str(tmp_path / "b"), "rounds": 6}).out
    a, _ = RunDir.load_tensors(RunDir(straight).checkpoint)
    b, _ = RunDir.load_tensors(RunDir(resumed).checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert RunDir(straight).ledger.read_bytes() == RunDir(resumed).ledger.read_bytes()
    weights, rounds = rebuild(straight)
    assert rounds == 6 and all(torch.equal(weights[n], a[n]) for n in weights)
