"""Metrics on hand-counted examples, global and per image."""
import json
import math

import numpy as np
import pytest

from geochange.engine.metrics import ConfusionMeter, confusion, format_summary, kappa, metrics_json, scores


def test_confusion_and_scores_by_hand():
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 0]])
    cm = confusion(pred, truth)
    assert cm.tolist() == [[4, 1], [1, 2]]  # TN FP / FN TP
    s = scores(cm)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["iou"] == pytest.approx(2 / 4)
    assert s["oa"] == pytest.approx(6 / 8)
    assert s["mIoU"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert s["mF1"] == pytest.approx((2 / 3 + 8 / 10) / 2)
    assert s["mAcc"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_valid_mask_excludes_pixels():
    truth = np.array([1, 0, 1])
    pred = np.array([1, 1, 0])
    assert confusion(pred, truth, valid=np.array([True, False, False])).tolist() == [[0, 0], [0, 1]]


def test_global_and_per_image_differ_and_nan_is_skipped():
    meter = ConfusionMeter()
    meter.add(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))  # P 0.5, R 1
    meter.add(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))  # no change anywhere: P, R undefined
    out = meter.summary()
    assert out["confusion"] == {"tn": 6, "fp": 1, "fn": 0, "tp": 1}
    assert out["global"]["precision"] == pytest.approx(0.5)
    assert out["per_image"]["precision"] == pytest.approx(0.5)  # the NaN image is left out
    assert out["per_image"]["oa"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["global"]["oa"] == pytest.approx(7 / 8)
    assert math.isnan(scores(np.array([[4, 0], [0, 0]]))["precision"])


def test_kappa_by_hand():
    cm = np.array([[50, 10], [5, 35]])  # TN FP / FN TP, 100 pixels
    # po = 85/100; chance: truth shares 60/40, predicted 55/45 -> pe = (60*55 + 40*45) / 100**2 = 0.51
    assert kappa(cm) == pytest.approx((0.85 - 0.51) / (1 - 0.51))
    assert kappa(np.array([[3, 0], [0, 0]])) != kappa(np.array([[3, 0], [0, 0]]))  # one class only: undefined


def test_kappa_of_maps_past_three_billion_pixels_does_not_overflow():
    """The product of two class totals passes int64 where the maps hold more than about 3e9 pixels."""
    cm = np.array([[3_200_000_000, 10_000_000], [20_000_000, 50_000_000]], dtype=np.int64)
    assert kappa(cm) == pytest.approx(kappa(cm.astype(float) / 1e6), rel=1e-12)
    assert 0.76 < kappa(cm) < 0.77


def test_summary_of_a_set_with_no_change_prints_undefined_metrics_as_na():
    """A split with no change pixel has no change-class precision/F1/IoU: NaN in the summary, null in a
    package's manifest; printing the summary read back from JSON raised TypeError at the end of a training."""
    meter = ConfusionMeter()
    meter.add(np.zeros((2, 4)), np.zeros((2, 4)))
    fresh = meter.summary()
    for summary in (fresh, json.loads(metrics_json(fresh))):
        rows = {line.split()[0]: line.split()[1:] for line in format_summary(summary).splitlines()[2:]}
        assert rows["f1"] == ["n/a", "n/a"] and rows["precision"] == ["n/a", "n/a"]
        assert rows["oa"] == ["1.0000", "1.0000"]
