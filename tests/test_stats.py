"""Intervals and paired tests: the bootstrap agrees with closed form where one exists, the paired test
finds a planted difference and does not invent an absent one, and predictions files compare by id."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pqa_core.errors import DataError
from pqa_core.evaluation.stats import (bootstrap_interval, compare_predictions, format_interval, intervals, paired_comparison,
                                       ratio_interval)


def test_bootstrap_interval_of_a_proportion_matches_the_binomial_interval():
    n, hits = 400, 120  # EM = 30% on 400 questions
    values = [1.0] * hits + [0.0] * (n - hits)
    mean, low, high = bootstrap_interval(values, seed=0)
    p = hits / n
    half = 1.959964 * math.sqrt(p * (1 - p) / n)  # Wald interval
    assert mean == pytest.approx(p)
    assert low == pytest.approx(p - half, abs=0.006) and high == pytest.approx(p + half, abs=0.006)


def test_a_ratio_interval_resamples_the_same_questions_for_both_systems():
    """Paired: where A scores half of B on every question the ratio is 0.5 in every resample; resampled apart,
    the same scores would give a wide interval. On noisy scores the interval holds the ratio, is seeded, and
    a zero denominator gives NaN, not an error."""
    rng = np.random.default_rng(2)
    b = rng.random(300)
    ratio, low, high = ratio_interval((0.5 * b).tolist(), b.tolist())
    assert ratio == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    a = np.clip(0.8 * b + rng.normal(0, 0.2, 300), 0, 1)
    ratio, low, high = ratio_interval(a.tolist(), b.tolist(), seed=1)
    assert ratio == pytest.approx(a.mean() / b.mean()) and low < ratio < high and high - low < 0.2
    assert ratio_interval(a.tolist(), b.tolist(), seed=1) == (ratio, low, high)
    assert all(math.isnan(x) for x in ratio_interval([0.5, 1.0], [0.0, 0.0]))
    with pytest.raises(ValueError, match="equal-length"):
        ratio_interval([1.0], [1.0, 0.5])


def test_bootstrap_is_seeded_and_narrows_with_more_questions():
    rng = np.random.default_rng(1)
    small, large = rng.random(50).tolist(), rng.random(2000).tolist()
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)
    assert bootstrap_interval(small, seed=3) != bootstrap_interval(small, seed=4)
    width = lambda v: bootstrap_interval(v)[2] - bootstrap_interval(v)[1]  # noqa: E731
    assert width(large) < width(small) / 3


def test_paired_test_finds_a_planted_difference():
    rng = np.random.default_rng(0)
    base = rng.random(300)
    better = np.clip(base + 0.08 + rng.normal(0, 0.1, 300), 0, 1)  # +8 points on the same questions
    result = paired_comparison(better.tolist(), base.tolist(), metric="F1")
    assert result.p_value < 0.001 and result.significant
    assert 0.05 < result.low < result.difference < result.high < 0.11


def test_paired_test_does_not_invent_an_absent_difference():
    rng = np.random.default_rng(0)
    p_values = []
    for trial in range(20):
        a = rng.random(200)
        b = a + rng.normal(0, 0.2, 200)  # noise around the same scores, no systematic difference
        p_values.append(paired_comparison(a.tolist(), b.tolist(), seed=trial, resamples=2000).p_value)
    assert sum(p < 0.05 for p in p_values) <= 3  # about 1 in 20 by chance, never most
    assert np.median(p_values) > 0.2


def test_paired_test_of_identical_systems_is_p_one():
    values = [0.0, 1.0, 0.5, 0.25]
    result = paired_comparison(values, values)
    assert result.difference == 0 and result.p_value == 1.0 and not result.significant


def test_intervals_are_in_percent_around_the_mean():
    out = intervals({"F1": [0.0, 1.0, 1.0, 0.5]})
    assert out["F1"] == pytest.approx(62.5)
    assert out["F1_ci95_low"] <= out["F1"] <= out["F1_ci95_high"]
    assert format_interval(out, "F1").startswith("F1=62.50 [")


def _predictions(path, scores):
    path.write_text("".join(json.dumps({"id": f"q{i}", "f1": f, "em": float(f == 1.0), "substring": f}) + "\n"
                            for i, f in enumerate(scores)))
    return path


def test_compare_predictions_pairs_by_question_id(tmp_path):
    a = _predictions(tmp_path / "a.jsonl", [1.0] * 60 + [0.0] * 40)
    b = _predictions(tmp_path / "b.jsonl", [1.0] * 30 + [0.0] * 70)
    f1 = {c.metric: c for c in compare_predictions(a, b)}["F1"]
    assert f1.n == 100 and f1.difference == pytest.approx(0.3) and f1.significant
    assert "+30.0" in f1.describe()
    other = _predictions(tmp_path / "c.jsonl", [1.0] * 99)
    with pytest.raises(DataError, match="not evaluated on the same questions"):
        compare_predictions(a, other)
