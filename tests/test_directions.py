import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedscalar import directions
from tests import reference


@pytest.mark.parametrize(
    "seed,p,index,numel", [(0, 0, 0, 1), (123456789, 3, 7, 1000), (2**32 - 1, 255, 40, 4133)]
)
def test_matches_independent_reference(seed, p, index, numel):
    ours = directions.rademacher(seed, p, index, 0, numel).numpy()
    np.testing.assert_array_equal(ours, reference.rademacher(seed, p, index, numel))


def test_chunking_does_not_change_values():
    whole = directions.rademacher(7, 1, 2, 0, 5000)
    parts = torch.cat(
        [directions.rademacher(7, 1, 2, s, e) for s, e in directions.chunks(5000, 64)]
    )
    assert torch.equal(whole, parts)


def test_unaligned_start_is_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        directions.rademacher(1, 0, 0, 5, 100)


def test_key_range_is_checked():
    with pytest.raises(ValueError, match="out of range"):
        directions.stream_key(2**32, 0, 0)


def _digest(seed: int) -> str:
    z = directions.rademacher(seed, 2, 3, 0, 100_000).numpy()
    return hashlib.sha256(z.tobytes()).hexdigest()


def test_reproducible_across_processes():
    code = (
        "from fedscalar import directions; import hashlib;"
        "z = directions.rademacher(99, 2, 3, 0, 100_000).numpy();"
        "print(hashlib.sha256(z.tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(99)


def test_statistics_look_like_rademacher():
    n = 1 << 18
    a = directions.rademacher(1, 0, 0, 0, n).double()
    b = directions.rademacher(2, 0, 0, 0, n).double()
    c = directions.rademacher(1, 1, 0, 0, n).double()
    d = directions.rademacher(1, 0, 1, 0, n).double()
    assert set(torch.unique(a).tolist()) == {-1.0, 1.0}
    bound = 5 / n**0.5  # five standard deviations
    assert abs(a.mean()) < bound
    for other in (b, c, d):  # different seed, perturbation or parameter: uncorrelated
        assert abs((a * other).mean()) < bound
    assert abs((a[1:] * a[:-1]).mean()) < bound  # neighbours uncorrelated


def test_combination_is_the_weighted_sum():
    terms = [(5, 0, 0.5), (5, 1, -2.0), (9, 0, 0.25)]
    expected = sum(torch.from_numpy(reference.rademacher(s, p, 3, 300)) * c for s, p, c in terms)
    assert torch.equal(directions.combination(terms, 3, 0, 300), expected)


def test_segments_equal_per_parameter_combinations():
    terms = [(3, 0, 0.5), (3, 1, -1.5)]
    segments = [(0, 7), (4, 100), (9, 33), (2, 64)]
    joined = directions.combination_segments(terms, segments)
    expected = torch.cat([directions.combination(terms, i, 0, n) for i, n in segments])
    assert torch.equal(joined, expected)


def test_rows_of_directions_equal_the_directions_one_by_one():
    rows = directions.rademacher_rows(99, 7, 3, 64, 64 + 1000)
    for p in range(7):
        assert torch.equal(rows[p], directions.rademacher(99, p, 3, 64, 64 + 1000))
