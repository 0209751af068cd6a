"""Scalar-only zeroth-order federated learning: DeComFL and HiSo (DESIGN.md 2.2, 2.3).

A round's global update is ``(seeds, gbar)``: K seeds and K x P averaged directional
derivatives. Every party applies it with `ZOAlgorithm.apply`, the single definition of
the update, so the server, every client after catch-up, a resumed run and an export all
hold bit-identical weights (and, for HiSo, the same curvature vector H).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedscalar import arithmetic
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
from fedscalar.messages import (
    CatchUp,
    GlobalUpdate,
    Message,
    ScalarReply,
    StateMessage,
    TrainRequest,
    encode,
    state_size,
)
from fedscalar.params import ParamSpace, Precond, Term, copy_flat_
from fedscalar.privacy.dp import GaussianDP


class ProtocolError(RuntimeError):
    """Messages arrived out of order, or do not fit the party's state."""


@dataclass(frozen=True)
class ZOSettings:
    perturbations: int = 5
    mu: float = 1e-3
    difference: str = "forward"  # or "central"
    hiso: bool = False
    beta: float = 0.95
    eps: float = 1e-8
    curvature_update: str = "last"  # or "all" (HiSo with K > 1)
    arithmetic: str = arithmetic.CURRENT  # how updates are computed (fedscalar.arithmetic)


class ZOState:
    """What every party agrees on after round ``round``: weights, and H for HiSo."""

    def __init__(self, space: ParamSpace, hiso: bool):
        self.space = space
        self.round = 0
        self.curvature: list[torch.Tensor] | None = (
            [torch.ones(p.numel(), dtype=torch.float32, device=p.device) for p in space.params]
            if hiso
            else None
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights, and H as ``curvature::<name>`` for HiSo (a checkpoint's content)."""
        out = self.space.state()
        if self.curvature is not None:
            names = self.space.names
            out.update({f"curvature::{n}": h for n, h in zip(names, self.curvature, strict=True)})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], rnd: int) -> None:
        """Restore what `tensors` returned, as of round ``rnd``."""
        self.space.load_state_(tensors)
        if self.curvature is not None:
            for n, h in zip(self.space.names, self.curvature, strict=True):
                h.copy_(tensors[f"curvature::{n}"])
        self.round = rnd


class ZOAlgorithm:
    """DeComFL (``hiso=False``) or HiSo (``hiso=True``): the math shared by all parties."""

    def __init__(self, settings: ZOSettings):
        self.s = settings
        self.name = "hiso" if settings.hiso else "decomfl"

    def precond(self, state: ZOState) -> Precond | None:
        """HiSo's direction scaling ``z / sqrt(H + eps)``, chunk by chunk; None for DeComFL."""
        if state.curvature is None:
            return None
        h, eps = state.curvature, self.s.eps

        def divide(index: int, start: int, stop: int, comb: torch.Tensor) -> None:
            comb.div_(torch.sqrt(h[index][start:stop] + eps).to(comb.dtype))

        return divide

    def apply(self, state: ZOState, update: GlobalUpdate) -> None:
        """``x <- x - lr * D_k`` for each local step k, ``D_k = (1/P) sum_p gbar_kp zhat_kp``.

        HiSo also updates ``H <- beta H + (1 - beta) D^2`` from the frozen round-start H
        (from the last local step, or sequentially from each with ``curvature_update="all"``).
        An update with lr 0 is a skipped round: it changes neither the weights nor H.
        """
        if update.round != state.round + 1:
            raise ProtocolError(f"update for round {update.round} applied at round {state.round}")
        if update.lr == 0:
            state.round = update.round
            return
        k_steps, p_count = update.scalars.shape
        steps = [
            [(update.seeds[k], p, float(update.scalars[k, p]) / p_count) for p in range(p_count)]
            for k in range(k_steps)
        ]
        arithmetic.apply_(
            state.space.params,
            state.curvature,
            steps,
            update.lr,
            eps=self.s.eps,
            beta=self.s.beta,
            update_all=self.s.curvature_update == "all",
            version=self.s.arithmetic,
        )
        state.round = update.round

    @torch.no_grad()
    def measure(
        self, state: ZOState, data: ClientData, batch, seed: int, local: list[Term]
    ) -> tuple[float, np.ndarray]:
        """Loss at the (locally updated) point and the P directional derivatives there."""
        space, mu, precond = state.space, self.s.mu, self.precond(state)

        def loss_at(extra: list[Term]) -> float:
            with space.perturbed(local + extra, precond):
                return float(data.loss(space.model, batch))

        g = np.empty(self.s.perturbations, dtype=np.float64)
        if self.s.difference == "forward":
            f0 = loss_at([])
            for p in range(self.s.perturbations):
                g[p] = (loss_at([(seed, p, mu)]) - f0) / mu
            return f0, g
        plus_minus = []
        for p in range(self.s.perturbations):
            fp, fm = loss_at([(seed, p, mu)]), loss_at([(seed, p, -mu)])
            g[p] = (fp - fm) / (2 * mu)
            plus_minus.append((fp + fm) / 2)
        return float(np.mean(plus_minus)), g

    def local_value(self, g: np.ndarray) -> np.ndarray:
        """What a client reports (and steps its own copy by) for derivatives ``g``."""
        return g

    def local_steps(
        self,
        state: ZOState,
        request: TrainRequest,
        data: ClientData,
        seed_of: Callable[[int, int], int] | None = None,
        missing: str = "catch-up",
    ) -> tuple[float, np.ndarray]:
        """K local ZO steps from the global point (the local progress is then discarded):
        step k measures along ``seed_of(k, request.seeds[k])`` (default: that seed).
        Returns the loss at the start point and the K x P scalars."""
        if state.round != request.round - 1:
            raise ProtocolError(
                f"client at round {state.round} asked to train round {request.round}: "
                f"{missing} missing"
            )
        local: list[Term] = []
        scalars = np.empty((len(request.seeds), self.s.perturbations), dtype=np.float32)
        first_loss = float("nan")
        coef = -request.lr / self.s.perturbations
        for k, round_seed in enumerate(request.seeds):
            seed = round_seed if seed_of is None else seed_of(k, round_seed)
            batch = data.make_batch(request.round, k)
            loss, g = self.measure(state, data, batch, seed, local)
            if k == 0:
                first_loss = loss
            scalars[k] = self.local_value(g)
            local += [(seed, p, coef * float(scalars[k, p])) for p in range(self.s.perturbations)]
        return first_loss, scalars

    def train(self, state: ZOState, request: TrainRequest, data: ClientData) -> ScalarReply:
        """K local ZO steps along the request's seeds; reply with their scalars."""
        loss, scalars = self.local_steps(state, request, data)
        return ScalarReply(request.round, loss, scalars)


class ZOClient(Client):
    """A client holding a `ZOState`: catches up by replay, then measures scalars."""

    def __init__(self, algo: ZOAlgorithm, state: ZOState):
        self.algo, self.state = algo, state

    @property
    def replicates(self) -> bool:
        return True

    @property
    def round(self) -> int:
        return self.state.round

    def replay(self, updates: Sequence[GlobalUpdate]) -> None:
        for update in updates:
            if update.round > self.state.round:  # a shared state may be ahead already
                self.algo.apply(self.state, update)

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        return self.state.tensors()

    def load_replica(self, tensors: dict[str, torch.Tensor], rnd: int) -> None:
        self.state.load_tensors(tensors, rnd)

    def catch_up(self, msg: CatchUp) -> None:
        """Replay the missed global updates (those already applied are skipped)."""
        self.replay(msg.updates)

    def load_state(self, msg: StateMessage) -> None:
        """Adopt the global state the server sent instead of a replay."""
        if msg.round <= self.state.round:  # a shared state is already there
            return
        self.state.space.load_flat_(torch.from_numpy(msg.weights))
        if self.state.curvature is not None:
            if msg.curvature is None:
                raise ProtocolError("a HiSo client needs the curvature with the weights")
            copy_flat_(self.state.curvature, torch.from_numpy(msg.curvature))
        self.state.round = msg.round

    def handle(self, messages: list[Message], data: ClientData) -> Message:
        reply: Message | None = None
        for msg in messages:
            if isinstance(msg, CatchUp):
                self.catch_up(msg)
            elif isinstance(msg, StateMessage):
                self.load_state(msg)
            elif isinstance(msg, TrainRequest):
                reply = self.algo.train(self.state, msg, data)
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} for a ZO client")
        if reply is None:
            raise ProtocolError("no TrainRequest in the round's messages")
        return reply


class ReplayServer(Server):
    """A server whose state is a `ZOState` replayed from the ledger with `ZOAlgorithm.apply`
    (DeComFL, HiSo, MeZO, FedKSeed): what they share besides their messages."""

    def __init__(self, algo: ZOAlgorithm, state: ZOState, history: list[GlobalUpdate]):
        self.algo, self.state, self.space = algo, state, state.space
        self.history = history  # rounds 1..n, shared with the ledger
        self.synced: dict[int, int] = {}  # client id -> rounds applied on that client

    @property
    def round(self) -> int:
        return self.state.round

    def mark_synced(self, client_id: int, rounds: int) -> None:
        self.synced[client_id] = rounds

    def _commit(self, update: GlobalUpdate, clients) -> None:
        """Apply a round's update; its clients now hold the state before it (they discard
        their local progress). Raises `Diverged` if the weights became non-finite."""
        self.apply(update)
        self.note_contributors(update.round, clients)
        check_finite(
            "the updated weights",
            update.round,
            *(float(p.detach().sum()) for p in self.space.params),
        )

    def apply(self, update: GlobalUpdate) -> None:
        self.algo.apply(self.state, update)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.state.tensors()

    def load_state_tensors(self, tensors, rnd) -> None:
        self.state.load_tensors(tensors, rnd)


class ZOServer(ReplayServer):
    """Aggregates scalars, applies the update, and serves catch-up from the ledger."""

    CATCH_UP: type[CatchUp] = CatchUp
    """The message a client that missed rounds gets them in."""

    def __init__(
        self,
        algo: ZOAlgorithm,
        state: ZOState,
        history: list[GlobalUpdate],
        catch_up_mode: str = "replay",
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        krum_f: int | None = None,
        dp: GaussianDP | None = None,
    ):
        super().__init__(algo, state, history)
        self.aggregator, self.trim_fraction, self.krum_f = aggregator, trim_fraction, krum_f
        self.dp = dp  # central DP: the server clips and noises the replies' sum
        self.catch_up_mode = catch_up_mode  # "replay", or "auto": the state when smaller

    def messages_for(self, client_id, rnd, lr, seeds) -> list[Message]:
        have = self.synced.get(client_id, 0)
        msgs: list[Message] = []
        if have < rnd - 1:
            k, p = len(seeds), self.algo.s.perturbations
            hiso = self.state.curvature is not None
            if self.catch_up_mode == "auto" and state_size(
                self.space.numel, hiso
            ) < self.CATCH_UP.size(rnd - 1 - have, k, p):
                msgs.append(self._state_message())
            else:
                msgs.append(self.CATCH_UP(tuple(self.history[have : rnd - 1])))
        msgs.append(TrainRequest(rnd, lr, tuple(seeds)))
        return msgs

    def _shape(self, seeds: tuple[int, ...]) -> tuple[int, int]:
        return len(seeds), self.algo.s.perturbations

    def max_reply_bytes(self, seeds):
        return len(encode(ScalarReply(0, 0.0, np.zeros(self._shape(seeds), np.float32))))

    def check_reply(self, rnd, seeds, reply) -> None:
        check_round(ScalarReply, rnd, reply)
        if reply.scalars.shape != self._shape(seeds):
            raise RejectedReply(
                f"{reply.scalars.shape} scalars, expected {self._shape(seeds)} (K x P)"
            )
        check_values(reply.loss, reply.scalars)

    def aggregate(self, rnd, lr, seeds, replies):
        cids = sorted(replies)
        shape = self._shape(seeds)
        rows = np.stack([replies[c].scalars.astype(np.float64).reshape(-1) for c in cids])
        gbar = combine(rows, rnd, self.aggregator, self.trim_fraction, self.krum_f, self.dp)
        gbar = gbar.reshape(shape).astype(np.float32)
        losses = [replies[c].loss for c in cids]
        update = GlobalUpdate(rnd, float(np.float32(lr)), tuple(seeds), gbar)
        self._commit(update, cids)
        return update, float(np.mean(losses))

    def aggregate_sum(self, rnd, lr, seeds, total, contributors):
        shape = self._shape(seeds)
        size = shape[0] * shape[1]
        if total.shape != (size + 1,):
            raise RejectedReply(f"a secure sum of {total.size} values, expected {size + 1}")
        check_values(float(total[-1]), total[:-1])
        mean = total / len(contributors)
        gbar = mean[:-1].reshape(shape).astype(np.float32)
        update = GlobalUpdate(rnd, float(np.float32(lr)), tuple(seeds), gbar)
        self._commit(update, sorted(contributors))
        return update, float(mean[-1])

    def skip(self, rnd, seeds) -> GlobalUpdate:
        update = GlobalUpdate(rnd, 0.0, tuple(seeds), np.zeros(self._shape(seeds), np.float32))
        self.apply(update)
        return update

    def _state_message(self) -> StateMessage:
        h = self.state.curvature
        return StateMessage(
            self.state.round,
            self.space.flat().numpy(),
            torch.cat(h).cpu().numpy() if h is not None else None,
        )
