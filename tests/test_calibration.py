"""Expected calibration error of predicted probabilities (medchain.metrics)."""
import numpy as np
import pytest

from medchain.metrics import expected_calibration_error


def test_ece_is_small_when_confidence_matches_accuracy_and_the_gap_when_it_does_not():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20000)
    right = rng.uniform(size=conf.size) < conf             # right exactly as often as it is confident
    labels = np.where(right, 1, 0)
    proba = np.stack([1 - conf, conf], axis=1)
    assert expected_calibration_error(labels, proba) == pytest.approx(0.0, abs=0.02)
    # always 90 % sure of class 1, right 60 % of the time: one bin, |0.6 - 0.9|
    labels = np.r_[np.ones(60, int), np.zeros(40, int)]
    assert expected_calibration_error(labels, np.tile([0.1, 0.9], (100, 1))) == pytest.approx(0.3, abs=1e-9)
    # all right (one outcome): 1 - mean confidence
    three = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    assert expected_calibration_error(np.array([1, 0]), three) == pytest.approx(1 - 0.65, abs=1e-9)


def test_ece_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="proba must be"):
        expected_calibration_error(np.array([0, 1]), np.ones((3, 2)) / 2)
