"""Privacy accounting of a DP run, by Google's ``dp-accounting`` library (RDP).

A round is one Gaussian mechanism on the sum of the clients' clipped replies. Its L2
sensitivity is ``2 * clip`` (one client's data replaced by another's: a clipped reply
moves anywhere inside the ball of radius ``clip``), and the noise's standard deviation is
``noise_multiplier * 2 * clip``.

- ``central`` (a trusted server noises the sum): the round's ``sampled`` of ``clients``
  are drawn uniformly without replacement, which amplifies privacy; the accountant
  composes ``SampledWithoutReplacementDpEvent`` rounds (Wang, Balle and Kasiviswanathan
  2019) under the replace-one relation.
- ``local`` (each client noises its own reply; the server learns who took part): no
  amplification, so every round counts in full for every client: ``GaussianDpEvent``
  rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant, compute_epsilon

MAX_NOISE_MULTIPLIER = 1000.0
"""A budget that needs more noise than this is refused (the model would learn nothing)."""


@dataclass(frozen=True)
class Spending:
    """One round's Renyi DP curve: orders and the RDP at each."""

    orders: np.ndarray
    rdp: np.ndarray

    def epsilon(self, rounds: int, delta: float) -> float:
        """Epsilon spent after ``rounds`` rounds, at ``delta``."""
        if rounds <= 0:
            return 0.0
        return float(compute_epsilon(self.orders, rounds * self.rdp, delta)[0])


class BudgetError(ValueError):
    """The privacy budget cannot be met by this configuration."""


@dataclass(frozen=True)
class Federation:
    """What the accountant needs to know about a run."""

    mode: str  # "central" or "local"
    clients: int
    sampled: int

    def event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """One round's mechanism."""
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        if self.mode == "local" or self.sampled == self.clients:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(self.clients, self.sampled, gaussian)

    def accountant(self) -> RdpAccountant:
        relation = (
            NeighboringRelation.REPLACE_ONE
            if self.mode == "central" and self.sampled < self.clients
            else NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        return RdpAccountant(neighboring_relation=relation)

    def spending(self, noise_multiplier: float) -> Spending:
        """Epsilon spent over rounds at this noise (RDP adds up over rounds, so one
        round's curve, scaled, gives any number of them)."""
        one = self.accountant()
        one.compose(self.event(noise_multiplier))
        return Spending(np.asarray(one.orders), np.asarray(one.rdp))

    def epsilon(self, noise_multiplier: float, rounds: int, delta: float) -> float:
        """Epsilon spent after ``rounds`` rounds at ``delta``."""
        return self.spending(noise_multiplier).epsilon(rounds, delta)

    def calibrate(self, epsilon: float, delta: float, rounds: int) -> float:
        """The smallest noise multiplier that keeps ``rounds`` rounds within
        (``epsilon``, ``delta``); `BudgetError` if it would exceed `MAX_NOISE_MULTIPLIER`."""
        if self.epsilon(MAX_NOISE_MULTIPLIER, rounds, delta) > epsilon:
            raise BudgetError(
                f"dp_epsilon: epsilon {epsilon:g} at delta {delta:g} over {rounds} rounds "
                f"({self.mode} DP, {self.sampled} of {self.clients} clients a round) needs a "
                f"noise multiplier above {MAX_NOISE_MULTIPLIER:g}: raise the budget or train "
                "fewer rounds"
            )
        return float(
            dp_accounting.calibrate_dp_mechanism(
                self.accountant,
                lambda z: dp_accounting.SelfComposedDpEvent(self.event(z), rounds),
                epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
                tol=1e-4,
            )
        )
