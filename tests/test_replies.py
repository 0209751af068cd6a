"""Bad replies are refused with a logged reason; a round is applied whole or not at all."""

import json

import numpy as np
import pytest
import torch

from fedscalar import RunConfig, run
from fedscalar.export import rebuild
from fedscalar.ledger import Ledger
from fedscalar.messages import ScalarReply, decode, encode
from fedscalar.runner import RunFailed
from fedscalar.runtime.local import LocalRuntime

SMALL = dict(task="digits", clients=4, sampled=2, eval_every=5, batch_size=16)


def corrupt(kind: str, wire: bytes) -> bytes | None:
    msg = decode(wire)
    if kind == "shape":
        return encode(ScalarReply(msg.round, msg.loss, np.zeros((1, 4), np.float32)))
    if kind == "nan":
        scalars = msg.scalars.copy()
        scalars[0, 2] = np.nan
        return encode(ScalarReply(msg.round, msg.loss, scalars))
    if kind == "inf-loss":
        return encode(ScalarReply(msg.round, float("inf"), msg.scalars))
    if kind == "stale":
        return encode(ScalarReply(msg.round - 1, msg.loss, msg.scalars))
    if kind == "oversized":
        return wire + bytes(1 << 20)
    if kind == "malformed":
        return wire[:-3]
    assert kind == "missing"
    return None


class Faulty(LocalRuntime):
    """The local runtime, with ``bad(round, client, attempt)`` naming replies to corrupt."""

    def __init__(self, r, bad):
        super().__init__(r.server, r.client, r.client_data)
        self.bad, self.clean, self.attempts = bad, {}, {}

    def run_round(self, rnd, lr, seeds, clients):
        traffic = super().run_round(rnd, lr, seeds, clients)
        for cid in list(traffic.replies):
            attempt = self.attempts.get((rnd, cid), 0)
            self.attempts[rnd, cid] = attempt + 1
            self.clean[rnd, cid] = decode(traffic.replies[cid])
            kind = self.bad(rnd, cid, attempt)
            if kind:
                wire = corrupt(kind, traffic.replies[cid])
                if wire is None:
                    del traffic.replies[cid]
                    traffic.missing[cid] = "gone away"
                else:
                    traffic.replies[cid] = wire
        return traffic


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


REASONS = {
    "shape": "(1, 4) scalars, expected (1, 5)",
    "nan": "a client value is not finite",
    "inf-loss": "the client loss is not finite",
    "stale": "reply for round 2 in round 3",
    "oversized": "1048607 bytes, more than the 31 a reply has",
    "malformed": "malformed reply: truncated message",
    "missing": "gone away",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_bad_reply_is_left_out_and_the_round_goes_on(tmp_path, kind):
    out = tmp_path / "r"
    seen = {}

    def bad(rnd, cid, attempt):
        if rnd == 3 and seen.setdefault(rnd, cid) == cid:  # the first client of round 3
            return kind
        return None

    holder = {}

    def runtime(r):
        holder["rt"] = Faulty(r, bad)
        return holder["rt"]

    run(RunConfig(rounds=5, out=str(out), **SMALL), runtime=runtime)
    m = _metrics(out)
    assert (m[3]["replies"], m[3]["rejected"]) == (1, 1)
    assert all(x["replies"] == 2 for x in m[1:] if x["round"] != 3)
    log = (out / "run.log").read_text()
    assert f"round 3: client {seen[3]} left out: {REASONS[kind]}" in log
    # the round's update is the other client's scalars alone (mean of one reply)
    other = next(c for (rnd, c) in holder["rt"].clean if rnd == 3 and c != seen[3])
    update = Ledger.open(out / "ledger.bin").updates[2]
    assert np.array_equal(update.scalars, holder["rt"].clean[3, other].scalars)


def test_a_missing_reply_is_retried(tmp_path):
    out = tmp_path / "r"
    cfg = RunConfig(rounds=4, out=str(out), min_replies=2, **SMALL)
    run(
        cfg,
        runtime=lambda r: Faulty(r, lambda rnd, c, a: "missing" if rnd == 2 and a == 0 else None),
    )
    m = _metrics(out)
    assert m[2]["replies"] == 2 and m[2]["rejected"] == 0
    assert "round 2: 0 valid replies, 2 needed; asking clients" in (out / "run.log").read_text()
    clean = tmp_path / "clean"
    run(cfg.model_copy(update={"out": str(clean)}))
    assert (out / "ledger.bin").read_bytes() == (clean / "ledger.bin").read_bytes()


@pytest.mark.parametrize("algorithm", ["decomfl", "hiso"])
def test_a_short_round_is_skipped_as_a_no_op(tmp_path, algorithm):
    out = tmp_path / "r"
    cfg = RunConfig(
        algorithm=algorithm, rounds=6, out=str(out), min_replies=2, short_round="skip", **SMALL
    )
    first = {}
    run(
        cfg,
        runtime=lambda r: Faulty(
            r, lambda rnd, c, a: "nan" if first.setdefault(rnd, c) == c and rnd == 3 else None
        ),
    )
    update = Ledger.open(out / "ledger.bin").updates[2]
    assert update.lr == 0 and not update.scalars.any()
    before, _ = rebuild(out, rounds=2)
    after, _ = rebuild(out, rounds=3)
    assert all(torch.equal(before[n], after[n]) for n in before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["rounds_skipped"] == 1
    assert _metrics(out)[3]["train_loss"] is None
    # replaying the ledger (no-op round included) gives the server's final weights
    final, _ = rebuild(out)
    from fedscalar.rundir import RunDir

    checkpoint, _ = RunDir.load_tensors(RunDir(out).checkpoint)
    assert all(torch.equal(final[n], checkpoint[n]) for n in final)


def test_a_round_short_after_its_retries_stops_the_run_resumably(tmp_path):
    out = tmp_path / "r"
    cfg = RunConfig(rounds=5, out=str(out), min_replies=2, round_retries=1, **SMALL)
    first = {}
    with pytest.raises(
        RunFailed,
        match=r"round 3: 1 valid replies, 2 needed \(client \d: \d+ bytes, more than the 31",
    ):
        run(
            cfg,
            runtime=lambda r: Faulty(
                r,
                lambda rnd, c, a: (
                    "oversized" if rnd == 3 and first.setdefault(rnd, c) == c else None
                ),
            ),
        )
    assert len(Ledger.open(out / "ledger.bin")) == 2 and _metrics(out)[-1]["round"] == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "short-round"
    assert "asking clients" in (out / "run.log").read_text()
    result = run(resume=True, resume_overrides={"out": str(out)})
    assert result.summary["rounds"] == 5
    clean = tmp_path / "clean"
    run(cfg.model_copy(update={"out": str(clean)}))
    assert (out / "ledger.bin").read_bytes() == (clean / "ledger.bin").read_bytes()


@pytest.mark.parametrize("algorithm", ["decomfl", "fedkseed"])
def test_a_resumed_run_knows_what_each_client_holds_as_the_uninterrupted_one(tmp_path, algorithm):
    """A client whose reply went missing did not take part in the round's update; after a
    resume the server still knows that, so it sends every client what it would have sent
    without the interruption (same bytes down, round by round)."""
    missing = lambda rnd, c, a: "missing" if (rnd, c) in ((2, 0), (3, 1), (3, 3)) else None  # noqa: E731
    settings = dict(SMALL, algorithm=algorithm, sampled=3, short_round="skip", min_replies=2)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    cfg = RunConfig(rounds=8, out=str(straight), **settings)
    run(cfg, runtime=lambda r: Faulty(r, missing))
    short = cfg.model_copy(update={"out": str(stopped), "rounds": 4})
    run(short, runtime=lambda r: Faulty(r, missing))
    run(resume=True, resume_overrides={"out": str(stopped), "rounds": 8})
    a, b = _metrics(straight), _metrics(stopped)
    assert [m.get("replies") for m in a] == [m.get("replies") for m in b]
    assert any(m.get("replies", 3) < 3 for m in a)  # the faults happened
    assert [m["bytes_down"] for m in a] == [m["bytes_down"] for m in b]
    assert (straight / "ledger.bin").read_bytes() == (stopped / "ledger.bin").read_bytes()
