"""FeedSign: sign replies at one bit each, the majority vote, and its update by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from fedscalar.algorithms.base import ClientData, RejectedReply
from fedscalar.algorithms.feedsign import FeedSignAlgorithm, FeedSignServer, majority
from fedscalar.algorithms.zo import ZOClient, ZOSettings, ZOState
from fedscalar.config import ConfigError, build_config
from fedscalar.messages import (
    GlobalUpdate,
    MessageError,
    SignReply,
    TrainRequest,
    VoteCatchUp,
    decode,
    encode,
)
from fedscalar.params import ParamSpace
from tests import reference


class Quadratic(nn.Module):
    """f_c(x) = 0.5 |x - t_c|^2: client c pulls towards its own target t_c."""

    def __init__(self, d=40):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, target):
        return 0.5 * ((self.x - target) ** 2).sum()


def _data(cid, target):
    return ClientData(cid, lambda r, k: target, lambda model, batch: model(batch))


def _z(seed, p, d):
    return torch.from_numpy(reference.rademacher(seed, p, 0, d)).double()


def test_sign_reply_is_one_bit_per_direction_and_round_trips():
    reply = SignReply(7, 0.25, np.array([[1, -1, -1, 1, 1, 1, -1, 1, -1]], np.float32))
    wire = encode(reply)
    assert len(wire) == 1 + 10 + 2  # tag, round/loss/K/P, 9 bits in 2 bytes
    assert len(encode(SignReply(1, 0.0, np.ones((1, 1), np.float32)))) == 12  # K = P = 1
    back = decode(wire)
    assert back.round == 7 and np.array_equal(back.signs, reply.signs)
    with pytest.raises(MessageError, match="padding"):
        decode(wire[:-1] + bytes([wire[-1] | 0x80]))
    with pytest.raises(MessageError, match=r"\+1 or -1"):
        encode(SignReply(1, 0.0, np.array([[0.5]], np.float32)))


def test_vote_catch_up_packs_two_bits_per_vote():
    votes = [np.array([[1, 0, -1]], np.float32), np.array([[-1, -1, 0]], np.float32)]
    msg = VoteCatchUp(tuple(GlobalUpdate(5 + i, 0.01, (9 + i,), v) for i, v in enumerate(votes)))
    wire = encode(msg)
    assert len(wire) == VoteCatchUp.size(2, 1, 3) == 1 + 10 + 2 * (4 + 4 + 1)
    back = decode(wire)
    for u, v in zip(back.updates, votes, strict=True):
        assert np.array_equal(u.scalars, v)
    assert [u.round for u in back.updates] == [5, 6]
    bad = bytearray(wire)
    bad[-1] |= 0x03  # code 3 in the first vote of the last round
    with pytest.raises(MessageError, match="code 3"):
        decode(bytes(bad))


def test_majority_vote_and_ties():
    rows = np.array([[1, 1, -1], [1, -1, -1], [-1, 1, 1]], np.float32)
    assert np.array_equal(majority(rows), [1, 1, -1])
    assert np.array_equal(majority(rows[:2]), [1, 0, -1])  # a split pair is a tie: 0


def test_two_clients_two_rounds_by_hand():
    """Each client's sign is that of its analytic directional derivative, the server's
    vote moves every replica by -lr * vote * z, and catch-up brings a client that missed
    a round to the server's weights bit for bit."""
    d, lr, mu = 40, 0.0625, 1e-4  # lr exact in float32, as the ledger holds it
    g = torch.Generator().manual_seed(3)
    t0 = torch.randn(d, generator=g, dtype=torch.float64)
    targets = {0: t0, 1: t0 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)}
    settings = ZOSettings(perturbations=1, mu=mu)
    server_model, client_models = Quadratic(d), {c: Quadratic(d) for c in (0, 1, 2)}
    history: list[GlobalUpdate] = []  # the ledger, which the runner appends to
    server = FeedSignServer(
        FeedSignAlgorithm(settings), ZOState(ParamSpace(server_model), False), history
    )
    clients = {
        c: ZOClient(FeedSignAlgorithm(settings), ZOState(ParamSpace(m), False))
        for c, m in client_models.items()
    }
    x = torch.zeros(d, dtype=torch.float64)  # the hand-computed weights
    votes = []
    for rnd, seed in ((1, 101), (2, 202)):
        z = _z(seed, 0, d)
        replies, expected = {}, []
        for cid in (0, 1):
            msgs = server.messages_for(cid, rnd, lr, (seed,))
            assert isinstance(msgs[-1], TrainRequest)
            replies[cid] = decode(encode(clients[cid].handle(msgs, _data(cid, targets[cid]))))
            grad = x - targets[cid]
            g = float(grad @ z) + mu / 2 * float(z @ z)  # forward difference, exactly
            expected.append(1.0 if g >= 0 else -1.0)
            assert replies[cid].signs[0, 0] == expected[-1]
        update, _ = server.aggregate(rnd, lr, (seed,), replies)
        history.append(update)
        vote = float(np.sign(sum(expected)))
        votes.append(vote)
        assert update.scalars[0, 0] == vote
        x = x - lr * vote * z
        torch.testing.assert_close(server_model.x.detach(), x, rtol=0, atol=1e-12)
    assert votes == [-1.0, 1.0]  # the weights moved in both rounds (no tie)
    # client 2 missed both rounds: it catches up from the votes and equals the server
    msgs = server.messages_for(2, 3, lr, (303,))
    assert isinstance(msgs[0], VoteCatchUp) and len(msgs[0].updates) == 2
    clients[2].handle([decode(encode(m)) for m in msgs], _data(2, targets[0]))
    assert torch.equal(client_models[2].x, server_model.x)


def test_server_rejects_a_reply_of_the_wrong_shape():
    server = FeedSignServer(
        FeedSignAlgorithm(ZOSettings(perturbations=1)), ZOState(ParamSpace(Quadratic()), False), []
    )
    with pytest.raises(RejectedReply, match="signs"):
        server.check_reply(1, (5,), SignReply(1, 0.0, np.ones((1, 2), np.float32)))
    assert server.max_reply_bytes((5,)) == 12


def test_defaults_and_bad_options():
    cfg = build_config(algorithm="feedsign")
    assert cfg.perturbations == 1 and cfg.effective_lr == 1e-2
    assert build_config(algorithm="feedsign", perturbations=3, local_steps=2).perturbations == 3
    with pytest.raises(ConfigError, match="projections: only for ferret, not feedsign"):
        build_config(algorithm="feedsign", projections=8)
    with pytest.raises(ConfigError, match="aggregator: feedsign takes mean only"):
        build_config(algorithm="feedsign", aggregator="median")
