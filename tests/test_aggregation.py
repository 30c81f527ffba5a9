import numpy as np
import pytest

from medchain.aggregation import ServerOptimizer, SparseUpdate, aggregate, weighted_mean


def test_dense_weighted_mean_is_exact():
    a = SparseUpdate(np.arange(3), np.array([1.0, 2.0, 3.0], np.float32), 1.0, 3)
    b = SparseUpdate(np.arange(3), np.array([4.0, 5.0, 6.0], np.float32), 3.0, 3)
    assert weighted_mean([a, b]).tolist() == [3.25, 4.25, 5.25]   # (1·a + 3·b) / 4


def test_sparse_mean_averages_only_over_sharers_and_leaves_the_rest():
    a = SparseUpdate(np.array([0, 2]), np.array([2.0, 4.0], np.float32), 1.0, 4)
    b = SparseUpdate(np.array([2, 3]), np.array([8.0, -1.0], np.float32), 3.0, 4)
    # coord 0: only a → 2; coord 1: nobody → 0; coord 2: (1·4 + 3·8)/4 = 7; coord 3: only b → -1
    assert weighted_mean([a, b]).tolist() == [2.0, 0.0, 7.0, -1.0]
    new = aggregate(np.full(4, 10.0, np.float32), [a, b])
    assert new.dtype == np.float32 and new.tolist() == [12.0, 10.0, 17.0, 9.0]


def test_server_momentum_accumulates_identically():
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    w = opt.step(np.zeros(2, np.float32), np.array([1.0, 2.0]))
    w = opt.step(w, np.array([1.0, 2.0]))      # buffer = 0.5·[1,2] + [1,2] = [1.5, 3]
    assert w.tolist() == [2.5, 5.0]


def test_statistics_coordinates_take_the_plain_update_under_server_momentum():
    opt = ServerOptimizer(lr=0.5, momentum=0.5, averaged=np.array([False, True]))
    w = opt.step(np.zeros(2, np.float32), np.array([1.0, -2.0]))
    w = opt.step(w, np.array([1.0, 4.0]))      # weight: 0.5·1 + 0.5·1.5; statistic: -2 + 4, no momentum
    assert w.tolist() == [1.25, 2.0]


def test_aggregation_refuses_bad_input():
    with pytest.raises(ValueError, match="zero updates"):
        weighted_mean([])
    with pytest.raises(ValueError, match="vector size"):
        weighted_mean([SparseUpdate(np.arange(2), np.ones(2, np.float32), 1.0, 2),
                       SparseUpdate(np.arange(3), np.ones(3, np.float32), 1.0, 3)])
    with pytest.raises(ValueError, match="weight must be > 0"):
        weighted_mean([SparseUpdate(np.arange(2), np.ones(2, np.float32), 0.0, 2)])
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        aggregate(np.zeros(2, np.float32), [], rule="max")
