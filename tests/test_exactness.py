"""Same seeds, same model: the server and every client agree bit for bit after catch-up."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedscalar.algorithms import ClientData
from fedscalar.algorithms.zo import (
    ProtocolError,
    ZOAlgorithm,
    ZOClient,
    ZOServer,
    ZOSettings,
    ZOState,
)
from fedscalar.messages import CatchUp, StateMessage, TrainRequest, decode, encode
from fedscalar.params import ParamSpace
from fedscalar.tasks.models import MLP

X = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


def _data(cid: int) -> ClientData:
    def make_batch(rnd, step):
        idx = np.random.default_rng([rnd, step, cid]).choice(200, 16, replace=False)
        return X[idx], Y[idx]

    return ClientData(cid, make_batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def _wire(msgs):
    return [decode(encode(m)) for m in msgs]


def _run_protocol(
    settings: ZOSettings,
    rounds: int,
    participation: dict[int, list[int]],
    k: int,
    catch_up_mode: str = "replay",
):
    torch.manual_seed(1)
    base = MLP(12, (16,), 3)
    algo = ZOAlgorithm(settings)
    history: list = []
    server = ZOServer(
        algo, ZOState(ParamSpace(copy.deepcopy(base)), settings.hiso), history, catch_up_mode
    )
    clients = {
        cid: ZOClient(
            ZOAlgorithm(settings), ZOState(ParamSpace(copy.deepcopy(base)), settings.hiso)
        )
        for cid in range(6)
    }
    for rnd in range(1, rounds + 1):
        seeds = tuple(int(s) for s in np.random.default_rng(rnd).integers(0, 2**32, k))
        replies = {}
        for cid in participation[rnd]:
            msgs = _wire(server.messages_for(cid, rnd, 0.05, seeds))
            replies[cid] = decode(encode(clients[cid].handle(msgs, _data(cid))))
        update, _ = server.aggregate(rnd, 0.05, seeds, replies)
        history.append(update)
    return server, clients, history


def _assert_identical(server, client):
    for a, b in zip(server.space.params, client.state.space.params, strict=True):
        assert torch.equal(a, b)
    if server.state.curvature is not None:
        for a, b in zip(server.state.curvature, client.state.curvature, strict=True):
            assert torch.equal(a, b)
    assert client.state.round == server.state.round


@pytest.mark.parametrize(
    "settings,k",
    [
        (ZOSettings(perturbations=5), 1),
        (ZOSettings(perturbations=3, difference="central"), 2),
        (ZOSettings(perturbations=5, hiso=True), 1),
        (ZOSettings(perturbations=2, hiso=True, curvature_update="all"), 3),
    ],
    ids=["decomfl", "decomfl-central-K2", "hiso", "hiso-all-K3"],
)
def test_server_and_clients_bit_identical_after_catch_up(settings, k):
    rounds = 24
    # client 0 every round, 1 and 2 alternate, 3 only in rounds 1 and 20 (skips 18),
    # 4 only in the last round, 5 never takes part.
    participation = {r: [0, 1 if r % 2 else 2] for r in range(1, rounds + 1)}
    participation[1].append(3)
    participation[20].append(3)
    participation[rounds].append(4)
    server, clients, history = _run_protocol(settings, rounds, participation, k)
    if settings.hiso:  # H really moved away from its initial ones
        assert not torch.equal(
            server.state.curvature[0], torch.ones_like(server.state.curvature[0])
        )
    for client in clients.values():
        behind = client.state.round
        assert behind < rounds  # every client discarded its local progress
        (catch_up,) = _wire([CatchUp(tuple(history[behind:]))])
        client.catch_up(catch_up)
        _assert_identical(server, client)


def test_client_refuses_to_train_without_catch_up():
    settings = ZOSettings(perturbations=2)
    _, clients, _ = _run_protocol(settings, 3, {1: [0], 2: [0], 3: [0]}, 1)

    with pytest.raises(ProtocolError, match="catch-up missing"):
        clients[5].handle([TrainRequest(4, 0.05, (1,))], _data(5))


@pytest.mark.parametrize("hiso", [False, True])
def test_auto_catch_up_sends_the_state_when_it_is_smaller(hiso):
    """A client 200 rounds behind gets weights (+H) instead of 200 rounds of scalars."""
    settings = ZOSettings(perturbations=5, hiso=hiso)
    rounds = 200
    participation = {r: [0] for r in range(1, rounds + 1)}
    server, clients, _ = _run_protocol(settings, rounds, participation, 1, "auto")
    msgs = server.messages_for(5, rounds + 1, 0.05, (7,))  # client 5 never took part
    assert isinstance(msgs[0], StateMessage)
    replay_bytes = len(encode(CatchUp(tuple(server.history))))
    assert len(encode(msgs[0])) < replay_bytes
    (state,) = _wire(msgs[:1])
    clients[5].load_state(state)
    _assert_identical(server, clients[5])
    # a client one round behind still gets the replay (28 bytes beat the state)
    assert isinstance(server.messages_for(0, rounds + 1, 0.05, (7,))[0], CatchUp)
