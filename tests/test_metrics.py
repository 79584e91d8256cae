"""evaluation.metrics against numbers worked out by hand and against scikit-learn's definitions.

The evaluate step reports these numbers and the gates read them, so each one is pinned to a value
computed independently here (a wrong bin edge in ECE or a swapped precision/recall would pass
every pipeline test that only checks the report's shape).
"""

from __future__ import annotations

import numpy as np
import pytest

from tlops.evaluation.metrics import classification_metrics, expected_calibration_error, plot_confusion

# 6 samples, 3 classes; predictions: 0, 1, 1, 2, 0, 2 (true: 0, 1, 2, 2, 1, 2)
PROBS = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.2, 0.7, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.1, 0.8],
        [0.55, 0.45, 0.0],
        [0.0, 0.0, 1.0],
    ]
)
Y = np.array([0, 1, 2, 2, 1, 2])


def test_ece_by_hand():
    # 2 bins (0, .5] and (.5, 1]: every confidence here is > .5, so one bin holding all six:
    # mean confidence (.9+.7+.6+.8+.55+1)/6 = .758333, accuracy 4/6 -> |.666667 - .758333|
    assert expected_calibration_error(PROBS, Y, bins=2) == pytest.approx(abs(4 / 6 - 4.55 / 6))
    # 10 bins: (.5,.6] {.55 wrong, .6 wrong}, (.6,.7] {.7 right}, (.7,.8] {.8 right},
    # (.8,.9] {.9 right}, (.9,1] {1.0 right}; a confidence equal to an upper edge falls in that bin
    want = (2 / 6) * abs(0 - 0.575) + (1 / 6) * 0.3 + (1 / 6) * 0.2 + (1 / 6) * 0.1 + (1 / 6) * 0.0
    assert expected_calibration_error(PROBS, Y, bins=10) == pytest.approx(want)
    # perfectly calibrated one-hot predictions that are all right: 0
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    # default: 15 bins
    assert expected_calibration_error(PROBS, Y) == pytest.approx(expected_calibration_error(PROBS, Y, bins=15))
    assert expected_calibration_error(PROBS, Y) != pytest.approx(expected_calibration_error(PROBS, Y, bins=2))


def test_ece_lowest_bin_excludes_zero_confidence_edge():
    # a confidence of exactly 1/3 with 3 bins lies on the first upper edge: it belongs to bin 1, not 2
    probs = np.array([[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]])
    y = np.array([1, 1])  # argmax of the first row is 0: wrong
    assert expected_calibration_error(probs, y, bins=3) == pytest.approx(0.5 * (1 / 3) + 0.5 * 0.0)


def test_classification_metrics_by_hand():
    m = classification_metrics(PROBS, Y, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    # class a: predicted twice, right once (precision 1/2), true once, found (recall 1)
    # class b: predicted twice, right once (1/2), true twice, found once (1/2)
    # class c: predicted twice, right twice (1), true three times, found twice (2/3)
    pc = m["per_class"]
    assert list(pc) == ["a", "b", "c"]
    assert (pc["a"]["precision"], pc["a"]["recall"], pc["a"]["support"]) == (0.5, 1.0, 1)
    assert (pc["b"]["precision"], pc["b"]["recall"], pc["b"]["support"]) == (0.5, 0.5, 2)
    assert pc["c"]["precision"] == 1.0 and pc["c"]["recall"] == pytest.approx(2 / 3) and pc["c"]["support"] == 3
    f1 = {"a": 2 / 3, "b": 0.5, "c": 0.8}
    for c, want in f1.items():
        assert pc[c]["f1"] == pytest.approx(want)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["ece"] == pytest.approx(expected_calibration_error(PROBS, Y, 15))
    assert m["ece"] != pytest.approx(expected_calibration_error(PROBS, Y, 2))
    assert classification_metrics(PROBS, Y, ["a", "b", "c"], bins=2)["ece"] == pytest.approx(abs(4 / 6 - 4.55 / 6))


def test_a_class_never_predicted_nor_present_is_reported_with_zeros():
    probs = np.array([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    m = classification_metrics(probs, np.array([0, 1]), ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert m["macro_f1"] == pytest.approx(2 / 3)  # the absent class counts (labels fixed), with 0


def test_plot_confusion_writes_a_png(tmp_path):
    out = tmp_path / "cm.png"
    plot_confusion([[3, 1], [0, 4]], ["a", "b"], out, "title")
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # square, growing with the number of classes: (2.5 + 0.45 * 2) inches at 90 dpi
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == height == round((2.5 + 0.45 * 2) * 90)


def test_default_bins_is_15_and_absent_classes_raise_no_warning():
    import warnings

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=200)
    y = rng.integers(0, 3, size=200)
    assert expected_calibration_error(probs, y, 15) != pytest.approx(expected_calibration_error(probs, y, 16))
    assert expected_calibration_error(probs, y) == expected_calibration_error(probs, y, 15)
    assert classification_metrics(probs, y, ["a", "b", "c"])["ece"] == pytest.approx(
        expected_calibration_error(probs, y, 15)
    )
    # a class with no sample and no prediction: reported as 0 without scikit-learn's
    # UndefinedMetricWarning in every evaluate log
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0]]), np.array([0, 1]), ["a", "b", "c"])
    assert m["per_class"]["c"]["f1"] == 0.0 and m["macro_f1"] == pytest.approx(2 / 3)


def test_ece_with_a_bin_that_mixes_right_and_wrong():
    # 10 bins: (.8,.9] {.85 right}: 1/3 * .15; (.9,1] {.92 wrong, .95 right}: 2/3 * |.5 - .935|
    probs = np.array([[0.85, 0.15, 0.0], [0.92, 0.08, 0.0], [0.95, 0.05, 0.0]])
    y = np.array([0, 1, 0])
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.15 / 3 + 2 / 3 * 0.435)


def _drawn(monkeypatch, cm, classes, tmp_path, title="title"):
    """plot_confusion's figure as it is saved (its axes, image and cell texts), and the dpi."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kw):
        seen["fig"], seen["kw"] = fig, kw
        return real(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_confusion(cm, classes, tmp_path / "cm.png", title)
    (ax,) = seen["fig"].axes
    return ax, seen["kw"]


def test_plot_confusion_draws_the_matrix_its_labels_and_every_count(monkeypatch, tmp_path):
    """What a reader of the PNG sees: the counts as a 'Blues' image, one centred 8-point label per
    cell (white on the dark cells, above half the largest count), the class names on both axes,
    'predicted' / 'true' and the title; long class names rotated 45 degrees."""
    cm = [[5, 1, 0], [2, 6, 3], [0, 0, 4]]
    ax, kw = _drawn(monkeypatch, cm, ["a", "b", "c"], tmp_path)
    assert kw == {"dpi": 90}
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("title", "predicted", "true")
    (img,) = ax.get_images()
    assert img.get_cmap().name == "Blues" and np.array_equal(img.get_array(), cm)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert list(ax.get_xticks()) == list(ax.get_yticks()) == [0, 1, 2]
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {0.0}
    cells = {(t.get_position(), t.get_text()): t for t in ax.texts}
    assert sorted((pos, s) for pos, s in cells) == sorted(((j, i), str(cm[i][j])) for i in range(3) for j in range(3))
    for (pos, s), t in cells.items():
        assert (t.get_ha(), t.get_va(), t.get_fontsize()) == ("center", "center", 8.0)
        assert t.get_color() == ("white" if int(s) > 3 else "black"), (pos, s)  # max 6: half is 3

    ax, _ = _drawn(monkeypatch, [[1, 0], [0, 1]], ["abc", "de"], tmp_path, "t")  # 3 characters: upright
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {0.0}
    ax, _ = _drawn(monkeypatch, [[1, 0], [0, 1]], ["abcd", "de"], tmp_path, "t")  # 4 or more: slanted
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {45.0}
    assert {t.get_rotation() for t in ax.get_yticklabels()} == {0.0}
    assert {t.get_color() for t in ax.texts if t.get_text() == "1"} == {"white"}  # 1 > 0.5
