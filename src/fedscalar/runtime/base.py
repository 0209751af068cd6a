"""What the training loop needs from a runtime: one round of message exchange."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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


class Runtime(ABC):
    @abstractmethod
    def run_round(
        self, rnd: int, lr: float, seeds: tuple[int, ...], clients: list[int]
    ) -> RoundTraffic:
        """Send each client in ``clients`` its messages for round ``rnd``; gather replies."""

    def close(self) -> None:  # noqa: B027
        """Release what the runtime holds (connections, processes)."""
