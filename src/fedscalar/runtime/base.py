"""What the training loop needs from a runtime: one round of message exchange."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedscalar.algorithms.base import Client, ClientData, Server
    from fedscalar.config import RunConfig


@dataclass(frozen=True)
class RunSetup:
    """What a runtime is built from: the run's config, its server, the client object
    (the simulator's one client serves every client id in turn) and each client's data."""

    cfg: RunConfig
    server: Server
    client: Client
    client_data: Callable[[int], ClientData]


@dataclass
class RoundTraffic:
    """One round's exchange as the server saw it.

    ``replies`` are the raw reply bytes (checked by the server before use); ``missing``
    names each sampled client that gave no reply, with the reason. Byte counts are the
    lengths of the encoded fedscalar messages (the payload, without transport framing).
    """

    replies: dict[int, bytes]
    missing: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    summed: Summed | None = None
    """Under secure aggregation: the unmasked sum in place of ``replies``."""


@dataclass(frozen=True)
class Summed:
    """What secure aggregation gives the server: the sum of the contributors' reply
    vectors (a reply's values, then its loss), and who contributed."""

    total: np.ndarray
    contributors: list[int]


class Runtime(ABC):
    @abstractmethod
    def run_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> RoundTraffic:
        """Send each client in ``clients`` its messages for round ``rnd``; gather replies."""

    def close(self) -> None:  # noqa: B027
        """Release what the runtime holds (connections, processes)."""


RuntimeFactory = Callable[[RunSetup], Runtime]
"""Builds a run's runtime (``fedscalar.run(..., runtime=...)``)."""
