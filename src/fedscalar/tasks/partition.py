"""Split training examples over clients, IID or Dirichlet over labels (flwr-datasets)."""

from __future__ import annotations

import warnings

import numpy as np


def partition(
    labels: np.ndarray, clients: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Example indices of each client. Every client gets at least one example."""
    if clients > len(labels):
        raise ValueError(f"clients: {clients} clients but only {len(labels)} training examples")
    if scheme == "iid":
        return iid(len(labels), clients, seed)
    if scheme != "dirichlet":
        raise ValueError(f"partition: unknown scheme {scheme!r}")
    # imported here: flwr-datasets loads pandas, matplotlib and HF datasets (seconds of
    # start-up that an IID run, the default, need not pay in every process)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    ds = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels.astype(np.int64)})
    part = DirichletPartitioner(
        num_partitions=clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=1,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return [
                np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(clients)
            ]
    except ValueError as e:
        raise ValueError(
            f"partition: Dirichlet(alpha={alpha}) left a client without examples ({e}); "
            "use fewer clients, a larger alpha or partition=iid"
        ) from None


def iid(examples: int, clients: int, seed: int) -> list[np.ndarray]:
    """IID: the examples shuffled with ``seed``, then cut into ``clients`` contiguous
    shards whose sizes differ by at most one, the larger first (flwr-datasets'
    IidPartitioner on the shuffled order, which the tests check it equals), each sorted."""
    perm = np.random.default_rng(seed).permutation(examples)
    return [np.sort(shard) for shard in np.array_split(perm, clients)]
