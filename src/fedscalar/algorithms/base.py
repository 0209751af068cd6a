"""The contract between algorithms and runtimes.

A runtime moves encoded messages; it never looks inside them. Per round it asks the
`Server` what to send each sampled client, hands the decoded messages to a `Client`
(in the simulator, one client object serves every client id in turn), and gives the
replies back to the `Server`, which aggregates them into one `GlobalUpdate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedscalar.messages import GlobalUpdate, Message, MessageError, decode
from fedscalar.params import ParamSpace


class Diverged(RuntimeError):
    """A round produced non-finite weights; it was not applied."""


class RejectedReply(ValueError):
    """A client's reply cannot be used; the message says why.

    ``nonfinite`` marks replies that were well formed but carried a NaN or infinity (a
    diverging model rather than a broken or hostile client).
    """

    def __init__(self, reason: str, nonfinite: bool = False):
        super().__init__(reason)
        self.nonfinite = nonfinite


@dataclass(frozen=True)
class ClientData:
    """What a client trains on: its minibatches and the loss."""

    client_id: int
    make_batch: Callable[[int, int], Any]
    """``make_batch(round, local_step) -> batch``: deterministic in its arguments."""
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]


class Server(ABC):
    """Server half of an algorithm. Owns the global state and the ledger's contents."""

    space: ParamSpace

    @abstractmethod
    def messages_for(
        self, client_id: int, rnd: int, lr: float, seeds: tuple[int, ...]
    ) -> list[Message]:
        """Messages that bring ``client_id`` up to date and ask it to train at ``rnd``."""

    @abstractmethod
    def max_reply_bytes(self, seeds: tuple[int, ...]) -> int:
        """The size of a valid reply to a request with these seeds (larger ones are refused)."""

    @abstractmethod
    def check_reply(self, rnd: int, seeds: tuple[int, ...], reply: Message) -> None:
        """Raise `RejectedReply` unless ``reply`` is a usable answer to this round's request."""

    def accept(self, rnd: int, seeds: tuple[int, ...], wire: bytes) -> Message:
        """Decode and check one reply from the network; `RejectedReply` says what is wrong."""
        limit = self.max_reply_bytes(seeds)
        if len(wire) > limit:
            raise RejectedReply(f"{len(wire)} bytes, more than the {limit} a reply has")
        try:
            reply = decode(wire)
        except MessageError as e:
            raise RejectedReply(f"malformed reply: {e}") from None
        self.check_reply(rnd, seeds, reply)
        return reply

    @abstractmethod
    def aggregate(
        self, rnd: int, lr: float, seeds: tuple[int, ...], replies: dict[int, Message]
    ) -> tuple[GlobalUpdate, float]:
        """Apply the round's update from replies `accept` passed; return it and the mean loss.

        Raises `Diverged` (and leaves the global state unchanged) if the weights would
        become non-finite.
        """

    def aggregate_sum(
        self,
        rnd: int,
        lr: float,
        seeds: tuple[int, ...],
        total: np.ndarray,
        contributors: list[int],
    ) -> tuple[GlobalUpdate, float]:
        """`aggregate` from the securely aggregated sum of the replies (their values,
        then their losses) of ``contributors``; only algorithms that take secure
        aggregation implement it."""
        raise NotImplementedError(f"{type(self).__name__} takes no secure aggregation")

    @abstractmethod
    def skip(self, rnd: int, seeds: tuple[int, ...]) -> GlobalUpdate:
        """Record round ``rnd`` as done without changing the state (too few replies).

        The returned no-op update has lr 0 and zero scalars; replaying it changes nothing.
        """

    @abstractmethod
    def apply(self, update: GlobalUpdate) -> None:
        """Replay one ledger entry onto the global state (resume, export)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue from here (weights and algorithm state)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], rnd: int) -> None:
        """Restore what `state_tensors` returned, as of round ``rnd``."""

    @property
    @abstractmethod
    def round(self) -> int:
        """Number of global updates applied to the state."""

    def mark_synced(self, client_id: int, rounds: int) -> None:  # noqa: B027
        """Record that ``client_id`` holds the state after ``rounds`` (a node said so)."""

    def note_contributors(self, rnd: int, clients: Sequence[int]) -> None:
        """Round ``rnd`` aggregated the replies of ``clients``: they now hold the state
        before it (they drop their local progress). The one rule for what a client holds,
        applied as a round completes and again, from the metrics, on resume."""
        for cid in clients:
            self.mark_synced(cid, rnd - 1)


class Client(ABC):
    """Client half of an algorithm: turns server messages into one reply."""

    @abstractmethod
    def handle(self, messages: list[Message], data: ClientData) -> Message:
        """Process the round's messages (catch-up first, then the request) and reply."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Client memory a checkpoint must keep (error-feedback residuals); usually none.
        A key ending in ``::<client id>`` belongs to that client (a Flower node keeps its
        own between messages)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore what `state_tensors` returned (other keys are ignored)."""

    # -- a replica of the global model, kept in step by replaying global updates ---------
    # (scalar-only methods; a client sent whole weights every round has none)

    @property
    def replicates(self) -> bool:
        """Whether this client keeps a replica that `replay` brings up to date."""
        return False

    @property
    def round(self) -> int:
        """Global updates applied to the replica (0 for a client without one)."""
        return 0

    def replay(self, updates: Sequence[GlobalUpdate]) -> None:
        """Apply the global updates after `round` (those already applied are skipped)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no replica")

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        """The replica's weights and algorithm state, as of `round` (a node's snapshot)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no replica")

    def load_replica(self, tensors: dict[str, torch.Tensor], rnd: int) -> None:
        """Restore what `replica_tensors` returned, as of round ``rnd``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no replica")


class WrappedClient(Client):
    """A client that changes what ``inner`` replies (an attack, a privacy mechanism)
    and is otherwise ``inner``: same memory, same replica."""

    def __init__(self, inner: Client):
        self.inner = inner

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_tensors(tensors)

    @property
    def replicates(self) -> bool:
        return self.inner.replicates

    @property
    def round(self) -> int:
        return self.inner.round

    def replay(self, updates: Sequence[GlobalUpdate]) -> None:
        self.inner.replay(updates)

    def replica_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.replica_tensors()

    def load_replica(self, tensors: dict[str, torch.Tensor], rnd: int) -> None:
        self.inner.load_replica(tensors, rnd)

    def handle(self, messages: list[Message], data: ClientData) -> Message:
        return self.changed(self.inner.handle(messages, data), data.client_id)

    @abstractmethod
    def changed(self, reply: Message, client_id: int) -> Message:
        """What client ``client_id`` sends in place of its honest ``reply``."""


def check_finite(what: str, rnd: int, *values: float) -> None:
    if not all(np.isfinite(v) for v in values):
        raise Diverged(f"round {rnd}: {what} is not finite")


def check_round(kind: type, rnd: int, reply: Message) -> None:
    """Reject a reply of the wrong type or for another round."""
    if not isinstance(reply, kind):
        raise RejectedReply(f"expected a {kind.__name__}, got a {type(reply).__name__}")
    if reply.round != rnd:  # type: ignore[attr-defined]
        raise RejectedReply(f"reply for round {reply.round} in round {rnd} (stale or replayed)")


def check_values(loss: float, values: np.ndarray) -> None:
    """Reject a reply carrying a non-finite loss or value."""
    if not np.isfinite(loss):
        raise RejectedReply("the client loss is not finite", nonfinite=True)
    if not np.isfinite(values).all():
        raise RejectedReply("a client value is not finite", nonfinite=True)
