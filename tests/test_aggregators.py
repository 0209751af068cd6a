"""Server-side aggregation rules: mean and the Byzantine-robust ones."""

import numpy as np
import pytest

from fedscalar.algorithms.aggregators import AGGREGATORS, aggregate, default_krum_f


def test_rule_names():
    assert AGGREGATORS == ("mean", "median", "trimmed-mean", "krum")


def test_mean():
    rows = [[1.0, 2.0, -3.0], [3.0, 6.0, 0.0]]
    out = aggregate(rows, "mean")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [2.0, 4.0, -1.5])


def test_median_odd():
    rows = [[1.0, 5.0], [3.0, 2.0], [2.0, 9.0]]
    # column 0 sorted 1,2,3 -> 2; column 1 sorted 2,5,9 -> 5
    np.testing.assert_array_equal(aggregate(rows, "median"), [2.0, 5.0])


def test_median_even():
    rows = [[1.0, 8.0], [4.0, 2.0], [2.0, 6.0], [10.0, 0.0]]
    # column 0 sorted 1,2,4,10 -> (2+4)/2 = 3; column 1 sorted 0,2,6,8 -> (2+6)/2 = 4
    np.testing.assert_array_equal(aggregate(rows, "median"), [3.0, 4.0])


def test_trimmed_mean_by_hand():
    rows = [
        [1.0, 10.0, 0.0],
        [2.0, 50.0, 0.0],
        [3.0, 20.0, 7.0],
        [4.0, 35.0, 1.0],
        [100.0, -5.0, 0.0],
    ]
    # n=5, trim 0.2 -> drop 1 smallest and 1 largest per coordinate
    # col 0: 1,2,3,4,100 -> mean(2,3,4) = 3
    # col 1: -5,10,20,35,50 -> mean(10,20,35) = 65/3
    # col 2: 0,0,0,1,7 -> mean(0,0,1) = 1/3
    out = aggregate(rows, "trimmed-mean", trim_fraction=0.2)
    np.testing.assert_allclose(out, [3.0, 65.0 / 3.0, 1.0 / 3.0], rtol=1e-12)


def test_trimmed_mean_no_trim_is_mean():
    rows = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    # floor(0.1 * 5) = 0: nothing dropped
    np.testing.assert_allclose(aggregate(rows, "trimmed-mean", trim_fraction=0.1), [22.0])
    # floor(0.4 * 5) = 2: only the middle value 3 is left
    np.testing.assert_allclose(aggregate(rows, "trimmed-mean", trim_fraction=0.4), [3.0])


def test_trimmed_mean_never_trims_everything():
    rows = [[1.0], [2.0], [9.0], [20.0]]
    # floor(0.5 * 4) = 2 would drop all 4; capped at (4-1)//2 = 1 -> mean(2, 9)
    np.testing.assert_allclose(aggregate(rows, "trimmed-mean", trim_fraction=0.5), [5.5])


KRUM_ROWS = np.array(
    [
        [0.0, 0.0],
        [1.0, 0.0],
        [0.0, 2.0],
        [1.0, 1.0],
        [10.0, 10.0],
    ]
)
# squared distances: d01=1 d02=4 d03=2 d04=200 d12=5 d13=1 d14=181 d23=2 d24=164 d34=162
# f=1 -> n-f-2 = 2 nearest: scores r0=1+2=3, r1=1+1=2, r2=2+4=6, r3=1+2=3, r4=162+164=326
# -> row 1


def test_krum_by_hand():
    out = aggregate(KRUM_ROWS, "krum", krum_f=1)
    np.testing.assert_array_equal(out, [1.0, 0.0])
    # the default f for 5 replies is 1, so the same row wins
    np.testing.assert_array_equal(aggregate(KRUM_ROWS, "krum"), [1.0, 0.0])


def test_krum_with_more_neighbours():
    # f=0 -> 3 nearest: r0=1+2+4=7, r1=1+1+5=7, r2=2+4+5=11, r3=1+2+2=5, r4=488 -> row 3
    np.testing.assert_array_equal(aggregate(KRUM_ROWS, "krum", krum_f=0), [1.0, 1.0])


def test_krum_returns_a_copy():
    rows = KRUM_ROWS.copy()
    out = aggregate(rows, "krum", krum_f=1)
    out[:] = -1.0
    np.testing.assert_array_equal(rows, KRUM_ROWS)


def test_krum_too_few_rows_falls_back_to_median():
    # n=2, f=0 -> n-f-2 = 0 neighbours: the coordinate-wise median, which is neither row
    np.testing.assert_array_equal(aggregate([[0.0, 4.0], [2.0, 0.0]], "krum"), [1.0, 2.0])
    # n=3, f=1 -> 0 neighbours as well
    rows = [[0.0, 0.0], [1.0, 5.0], [9.0, 2.0]]
    np.testing.assert_array_equal(aggregate(rows, "krum", krum_f=1), [1.0, 2.0])


@pytest.mark.parametrize(
    ("replies", "f"), [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 2), (10, 3)]
)
def test_default_krum_f(replies, f):
    assert default_krum_f(replies) == f
    assert replies > 2 * f + 2 or f == 0


@pytest.mark.parametrize("rule", AGGREGATORS)
def test_single_row_returns_itself(rule):
    row = np.array([[1.5, -2.0, 3.25]])
    np.testing.assert_array_equal(aggregate(row, rule), [1.5, -2.0, 3.25])


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate([[1.0], [2.0]], "geometric-median")


def test_empty_rows():
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 3)), "mean")


def test_robust_rules_resist_one_outlier():
    honest = [
        [1.00, 0.98, 1.02],
        [1.01, 1.00, 0.99],
        [0.99, 1.03, 1.00],
        [1.02, 0.97, 1.01],
    ]
    rows = np.array([*honest, [1e6, 1e6, 1e6]])
    for rule in ("median", "trimmed-mean", "krum"):
        out = aggregate(rows, rule, trim_fraction=0.2)
        assert np.all(np.abs(out - 1.0) < 0.1), (rule, out)
    assert aggregate(rows, "krum").tolist() in honest
    mean = aggregate(rows, "mean")
    assert np.all(np.abs(mean - 1.0) > 1e5)


def test_rows_in_any_order_give_same_result():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((7, 4))
    perm = rng.permutation(7)
    for rule in AGGREGATORS:
        np.testing.assert_allclose(aggregate(rows, rule), aggregate(rows[perm], rule))


def test_unknown_rule_is_refused_even_for_one_row():
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate(np.array([[1.0]]), "bogus")
