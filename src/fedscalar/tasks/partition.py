"""Split training examples over clients, IID or Dirichlet over labels (flwr-datasets)."""

from __future__ import annotations

import warnings

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner


def partition(
    labels: np.ndarray, clients: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Example indices of each client. Every client gets at least one example."""
    if clients > len(labels):
        raise ValueError(f"clients: {clients} clients but only {len(labels)} training examples")
    ds = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels.astype(np.int64)})
    if scheme == "iid":
        part = IidPartitioner(num_partitions=clients)
    elif scheme == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        raise ValueError(f"partition: unknown scheme {scheme!r}")
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = [
                np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(clients)
            ]
    except ValueError as e:
        raise ValueError(
            f"partition: Dirichlet(alpha={alpha}) left a client without examples ({e}); "
            "use fewer clients, a larger alpha or partition=iid"
        ) from None
    if scheme == "iid":  # IidPartitioner splits in order: shuffle deterministically first
        perm = np.random.default_rng(seed).permutation(len(labels))
        out = [np.sort(perm[idx]) for idx in out]
    return out
