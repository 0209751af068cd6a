"""Secure aggregation of scalars: the unmasked sum, dropouts, tampering, byte counts."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedscalar import RunConfig, run
from fedscalar.cli import app
from fedscalar.ledger import Ledger
from fedscalar.privacy import secagg
from fedscalar.privacy.secagg import SecAggError, combine, secure_sum, split


def _values(n: int, size: int = 6, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=size) * 10.0 ** rng.integers(-3, 3) for c in range(n)}


@pytest.mark.parametrize("n", [3, 5, 8])
def test_the_unmasked_sum_is_the_plain_sum_to_the_fixed_point_resolution(n):
    values = _values(n)
    result = secure_sum(values, rnd=4)
    plain = np.sum(list(values.values()), axis=0)
    assert np.max(np.abs(result.total - plain)) <= n * 2.0 ** -(secagg.FRACTION_BITS + 1)
    # the masks cancel exactly in the ring: the result is the sum of the encodings,
    # whatever keys and masks this round drew
    ring = np.sum([secagg.encode(v) for v in values.values()], axis=0, dtype=np.uint64)
    assert np.array_equal(result.total, secagg.decode(ring))
    assert np.array_equal(secure_sum(values, rnd=4).total, result.total)


def test_a_masked_input_alone_hides_the_value():
    values = _values(3)
    client = secagg.SecAggClient(0, rnd=1)
    others = [secagg.SecAggClient(c, rnd=1) for c in (1, 2)]
    roster = secagg.roster_bytes([p.advertise() for p in (client, *others)])
    server = secagg.SecAggServer(1, threshold=2)
    server.roster({p.cid: p.advertise() for p in (client, *others)})
    boxes = server.route({p.cid: p.share_keys(roster, 2) for p in (client, *others)})
    wire = client.masked_input(values[0], boxes[0])
    seen = secagg.decode(np.frombuffer(wire, dtype=np.uint64, offset=8))
    assert np.all(np.abs(seen - values[0]) > 1.0)  # masked values look like noise


@pytest.mark.parametrize("dropped", [{1}, {0, 4}, {2, 3}])
def test_dropped_clients_masks_are_removed(dropped):
    values = _values(6, seed=1)
    result = secure_sum(values, rnd=9, drop_after_sharing=frozenset(dropped))
    survivors = [c for c in values if c not in dropped]
    assert result.survivors == survivors
    plain = np.sum([values[c] for c in survivors], axis=0)
    assert np.max(np.abs(result.total - plain)) <= 6 * 2.0**-25


def test_too_few_survivors_stop_the_round():
    with pytest.raises(SecAggError, match="2 masked inputs, 3 needed"):
        secure_sum(_values(5), rnd=1, drop_after_sharing=frozenset({0, 1, 2}))


def test_a_tampered_share_is_detected():
    with pytest.raises(SecAggError, match="client 3: the share from client 1 failed"):
        secure_sum(_values(4), rnd=2, tamper=(1, 3))


def test_fewer_than_three_clients_are_refused():
    with pytest.raises(SecAggError, match="at least 3 clients"):
        secure_sum(_values(2), rnd=1)


def test_values_the_ring_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="finite values below"):
        secagg.encode(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="finite values below"):
        secagg.encode(np.array([2.0**31]))


def test_shamir_shares_rebuild_the_secret_from_any_threshold():
    secret = bytes(range(32))
    shares = split(secret, list(range(7)), threshold=4)
    assert combine({h: shares[h] for h in (6, 1, 3, 0)}, 4) == secret
    assert combine({h: shares[h] for h in (2, 4, 5, 6)}, 4) == secret
    wrong = {h: shares[h] for h in (2, 4, 5)} | {6: (shares[6] + 1) % secagg.PRIME}
    with pytest.raises(SecAggError, match="do not rebuild a secret"):
        combine(wrong, 4)  # a wrong share gives a field element no 32-byte secret maps to
    with pytest.raises(SecAggError, match="3 shares, 4 needed"):
        combine({h: shares[h] for h in (0, 1, 2)}, 4)


@pytest.mark.parametrize("n,size", [(3, 5), (5, 6), (10, 1)])
def test_byte_counts_are_the_encoded_messages(n, size):
    result = secure_sum(_values(n, size), rnd=3)
    # keys 4 + 2 x 32; shares: a count, then per other client ids, nonce, two 66-byte
    # shares and the AES-GCM tag; the masked ring values; unmasking: n self-mask shares
    share_box = 4 + (n - 1) * (8 + 12 + 2 * 66 + 16)
    up = 68 + share_box + (8 + 8 * size) + (4 + 4 + 70 * n + 4)
    down = (4 + 68 * n) + share_box + (4 + 4 * n + 4)
    assert set(result.bytes_up.values()) == {up}
    assert set(result.bytes_down.values()) == {down}


SMALL = dict(task="digits", clients=6, sampled=4, eval_every=5, batch_size=16, lr=0.03)


def _ledger(path):
    return Ledger.open(path / "ledger.bin").updates


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso"])
def test_a_secure_run_applies_the_plain_runs_updates_and_counts_its_messages(tmp_path, algorithm):
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    run(RunConfig(algorithm=algorithm, rounds=8, out=str(plain), **SMALL))
    run(RunConfig(algorithm=algorithm, rounds=8, out=str(secure), secure_aggregation=True, **SMALL))
    for a, b in zip(_ledger(plain), _ledger(secure), strict=True):
        assert a.seeds == b.seeds and np.allclose(a.scalars, b.scalars, rtol=0, atol=1e-6)
    metrics = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()][1:]
    plain_metrics = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()][1:]
    n, size = 4, 5 + 1  # K x P scalars and the loss
    share_box = 4 + (n - 1) * (8 + 12 + 2 * 66 + 16)
    up = 68 + share_box + (8 + 8 * size) + (4 + 4 + 70 * n + 4)
    down = (4 + 68 * n) + share_box + (4 + 4 * n + 4)
    for m, p in zip(metrics, plain_metrics, strict=True):
        assert m["bytes_up"] == n * up  # the reply itself never leaves its client
        assert m["bytes_down"] == p["bytes_down"] + n * down
        assert m["train_loss"] == pytest.approx(p["train_loss"], abs=1e-6)


def test_a_secure_run_resumes_bit_exact(tmp_path):
    opts = {**SMALL, "secure_aggregation": True}
    full, part = tmp_path / "full", tmp_path / "part"
    run(RunConfig(algorithm="decomfl", rounds=9, out=str(full), **opts))
    run(RunConfig(algorithm="decomfl", rounds=4, out=str(part), **opts))
    run(resume=True, resume_overrides={"out": str(part), "rounds": 9})
    # fresh keys and masks every round, yet the masks cancel exactly: same ledger
    assert (full / "ledger.bin").read_bytes() == (part / "ledger.bin").read_bytes()


def test_local_dp_and_secure_aggregation_combine(tmp_path):
    out = tmp_path / "r"
    dp = dict(dp_noise_multiplier=0.5, dp_mode="local", dp_seed=1)
    run(
        RunConfig(
            algorithm="decomfl", rounds=3, out=str(out), secure_aggregation=True, **dp, **SMALL
        )
    )
    assert len(_ledger(out)) == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampled", "2"], "at least 3 sampled"),
        (["--algorithm", "fedavg"], "for decomfl, hiso"),
        (["--aggregator", "median"], "cannot take the median"),
        (["--dp-epsilon", "3"], "use --dp-mode local"),
    ],
)
def test_bad_secure_aggregation_options_exit_2_with_one_line(tmp_path, args, message):
    base = ["run", "--out", str(tmp_path / "x"), "--quiet", "--secure-aggregation"]
    result = CliRunner().invoke(app, [*base, "--clients", "6", "--sampled", "4", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_clients_that_drop_before_sharing_are_left_out_of_the_masks():
    values = _values(6, seed=2)
    result = secure_sum(
        values, rnd=5, drop_before_sharing=frozenset({1}), drop_after_sharing=frozenset({4})
    )
    assert result.survivors == [0, 2, 3, 5]
    plain = np.sum([values[c] for c in result.survivors], axis=0)
    assert np.max(np.abs(result.total - plain)) <= 6 * 2.0**-25


def test_a_client_rebuilt_from_its_state_masks_the_same():
    a, b, c = (secagg.SecAggClient(i, rnd=3) for i in range(3))
    adverts = {p.cid: p.advertise() for p in (a, b, c)}
    server = secagg.SecAggServer(3, threshold=2)
    roster = server.roster(adverts)
    boxes = server.route({p.cid: p.share_keys(roster, 2) for p in (a, b, c)})
    again = secagg.SecAggClient.from_state(a.state())
    x = np.array([0.5, -2.0])
    assert again.masked_input(x, boxes[0]) == a.masked_input(x, boxes[0])
    assert again.state() == a.state()
