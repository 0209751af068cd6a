import numpy as np
import pytest
import torch

from fedscalar.config import RunConfig
from fedscalar.tasks import build_task
from fedscalar.tasks.partition import partition

LABELS = np.repeat(np.arange(10), 50)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_a_disjoint_cover(scheme):
    parts = partition(LABELS, 8, scheme, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 8 and all(len(p) > 0 for p in parts)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))
    again = partition(LABELS, 8, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize(
    "examples,clients,seed", [(500, 8, 3), (1437, 10, 0), (7, 7, 1), (103, 4, 9)]
)
def test_iid_equals_flower_datasets_iid_partitioner_on_the_shuffled_order(examples, clients, seed):
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    part = IidPartitioner(num_partitions=clients)
    part.dataset = Dataset.from_dict({"index": np.arange(examples)})
    perm = np.random.default_rng(seed).permutation(examples)
    reference = [np.sort(perm[part.load_partition(i)["index"]]) for i in range(clients)]
    mine = partition(np.zeros(examples, dtype=np.int64), clients, "iid", 1.0, seed)
    assert len(mine) == clients
    assert all(np.array_equal(a, b) for a, b in zip(mine, reference, strict=True))


def test_dirichlet_skews_labels_and_iid_does_not():
    def label_spread(parts):  # mean over clients of the largest label share
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    assert label_spread(partition(LABELS, 5, "iid", 1.0, 0)) < 0.2
    assert label_spread(partition(LABELS, 5, "dirichlet", 0.1, 0)) > 0.35


def test_impossible_dirichlet_split_names_the_problem():
    with pytest.raises(ValueError, match="partition: Dirichlet"):
        partition(LABELS[:20], 15, "dirichlet", alpha=0.05, seed=0)


@pytest.mark.parametrize(
    "name,train,test,features", [("digits", 1437, 360, 64), ("mnist", 4000, 1000, 784)]
)
def test_builtin_tasks(name, train, test, features):
    task = build_task(RunConfig(task=name))
    assert task.x_train.shape == (train, features) and task.x_test.shape[0] == test
    assert float(task.x_train.min()) >= 0 and float(task.x_train.max()) <= 1
    a, b = task.build_model(0), task.build_model(0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    metrics = task.evaluate(a)
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
