"""The numpy classification report equals scikit-learn's, as a dict and as text."""
import numpy as np
import pytest
from sklearn.metrics import classification_report as sk_report

from pipeline.class_report import classification_report, report_text


@pytest.mark.parametrize("seed", range(4))
def test_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    classes = ["daisy", "dandelion", "roses", "sunflowers", "a_much_longer_class_name"]
    y_true = rng.integers(0, 4, 60)           # the last class never occurs: zero support
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 5, 60))
    y_pred[y_pred == 2] = 1                   # class 2 never predicted: zero precision denominator
    ours = classification_report(y_true, y_pred, classes)
    theirs = sk_report(y_true, y_pred, labels=list(range(5)), target_names=classes, output_dict=True,
                       zero_division=0)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, dict):
            assert ours[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12)
    assert report_text(ours, classes) == sk_report(y_true, y_pred, labels=list(range(5)), target_names=classes,
                                                   digits=3, zero_division=0)


def test_empty_and_perfect():
    perfect = classification_report([0, 1, 1], [0, 1, 1], ["a", "b"])
    assert perfect["accuracy"] == 1.0 and perfect["macro avg"]["f1-score"] == 1.0
    assert classification_report([], [], ["a", "b"])["accuracy"] == 0.0
