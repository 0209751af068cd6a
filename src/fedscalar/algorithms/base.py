"""The contract between algorithms and runtimes.

A runtime moves encoded messages; it never looks inside them. Per round it asks the
`Server` what to send each sampled client, hands the decoded messages to a `Client`
(in the simulator, one client object serves every client id in turn), and gives the
replies back to the `Server`, which aggregates them into one `GlobalUpdate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedscalar.messages import GlobalUpdate, Message
from fedscalar.params import ParamSpace


class Diverged(RuntimeError):
    """A round produced a non-finite loss, scalar or weight; it was not applied."""


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
    def aggregate(
        self, rnd: int, lr: float, seeds: tuple[int, ...], replies: dict[int, Message]
    ) -> tuple[GlobalUpdate, float]:
        """Apply the round's update from client replies; return it and the mean train loss.

        Raises `Diverged` (and leaves the global state unchanged) on non-finite values.
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
        """Record that ``client_id`` holds the state after ``rounds`` (used on resume)."""


class Client(ABC):
    """Client half of an algorithm: turns server messages into one reply."""

    @abstractmethod
    def handle(self, messages: list[Message], data: ClientData) -> Message:
        """Process the round's messages (catch-up first, then the request) and reply."""


def check_finite(what: str, rnd: int, *values: float) -> None:
    if not all(np.isfinite(v) for v in values):
        raise Diverged(f"round {rnd}: {what} is not finite")
