"""What fedscalar puts inside Flower messages.

Every Flower message holds one `ConfigRecord` named ``fedscalar``:

- ``query`` (server -> node, once per node and run): ``run`` (run key), ``config`` (the
  run's TOML). Reply: ``partition`` (the node's client id) and ``round`` (the rounds its
  model holds), or ``error``.
- ``train`` (server -> node, per round): ``run``, ``messages`` (the encoded fedscalar
  messages: catch-up, then the request). Reply: ``reply`` (the encoded fedscalar reply),
  or ``behind`` (the node's model holds fewer rounds than the catch-up assumed: a node
  that restarted), or ``setup`` (the node does not know the run), or ``error``.
- under secure aggregation, ``train`` also carries ``secure`` and the node answers
  ``advert`` (its public keys) in place of ``reply``, keeping the reply; then three more
  ``train`` messages a round carry ``secagg`` (the step: ``share`` with ``roster`` and
  ``threshold``, ``mask`` with ``inbox``, ``unmask`` with ``request``) and ``round``, and
  are answered with ``secagg`` (the step's bytes; `fedscalar.privacy.secagg`).

Payload bytes (what `fedscalar.runner` reports) are the fedscalar messages only; the
query, the record keys and Flower's own framing are transport overhead.
"""

from __future__ import annotations

import hashlib
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedscalar.config import RESUMABLE_CHANGES, RunConfig

RECORD = "fedscalar"
QUERY, TRAIN = "query", "train"


def run_key(cfg: RunConfig) -> str:
    """Identifies what a node's model depends on (not lr, rounds, out or reply options)."""
    fixed = cfg.model_dump(exclude=set(RESUMABLE_CHANGES))
    return hashlib.sha256(repr(sorted(fixed.items())).encode()).hexdigest()[:16]


def pack(**values: Any) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(values)})


def unpack(content: RecordDict) -> dict[str, Any]:
    if RECORD not in content:
        raise ValueError(f"message without a {RECORD!r} record")
    return dict(content[RECORD])
