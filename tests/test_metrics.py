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


def test_results_table_rounds_each_column_alike_and_only_for_display():
    from pipeline.metrics import format_results

    metrics = {"head": {"val_acc": 2 / 3, "seconds": 9.56104, "best_epoch": 3},
               "finetune": {"val_acc": 0.5, "seconds": 105.8321, "epochs": 2}}
    rows = {line.split()[0]: line.split() for line in format_results(metrics).splitlines()}
    assert rows["head"][1:3] == ["0.6667", "9.6"] and rows["finetune"][1:3] == ["0.5000", "105.8"]
    assert metrics["head"]["val_acc"] == 2 / 3  # the stored figure keeps its precision


def test_score_accuracy_is_the_exact_fraction_numpy_gives():
    """val_acc is compared with accuracies computed elsewhere: it must be correct / total in float64."""
    import torch
    from torch import nn

    from pipeline.engine import score

    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    acc = score(logits, targets, nn.CrossEntropyLoss())["acc"]
    assert acc == np.mean(np.array([0, 1, 0]) == np.array([0, 1, 1])) == 2 / 3  # not float32's 0.6666666865
