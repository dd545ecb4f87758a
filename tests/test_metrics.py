import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from pipeline.metrics import mean_per_class_accuracy, per_class_accuracy

# Hand-computed: class 0 has 4 samples, 3 right (0.75); class 1 has 2, 1 right (0.5); class 2 has 1, right (1.0).
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 0, 2])


def test_per_class_accuracy_by_hand():
    assert per_class_accuracy(Y_TRUE, Y_PRED, 3) == pytest.approx([0.75, 0.5, 1.0])


def test_mean_per_class_accuracy_by_hand():
    assert mean_per_class_accuracy(Y_TRUE, Y_PRED, 3) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert np.mean(Y_TRUE == Y_PRED) == pytest.approx(5 / 7)  # top-1 weighs the big class more
    assert mean_per_class_accuracy(Y_TRUE, Y_PRED) == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))


def test_class_without_samples_is_left_out():
    assert per_class_accuracy(Y_TRUE, Y_PRED, 4)[3] is None
    assert mean_per_class_accuracy(Y_TRUE, Y_PRED, 4) == pytest.approx(0.75)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="targets but"):
        per_class_accuracy(Y_TRUE, Y_PRED[:-1], 3)
