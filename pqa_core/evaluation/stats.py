"""Uncertainty of a result: bootstrap intervals over questions and paired tests between two systems.

A mean over a few hundred questions moves by whole points when one answer changes, so every
evaluation reports a 95% percentile-bootstrap interval (seeded, so the same predictions give the
same interval), and a difference between two systems answered on the same questions (the same ids, and under each id
the same question text and gold answers) is judged on the per-question differences: their mean, its paired-bootstrap interval and a two-sided
sign-flip permutation p-value.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from pqa_core.errors import DataError

RESAMPLES = 10_000
CONFIDENCE = 0.95
PER_QUESTION_METRICS = {"EM": "em", "F1": "f1", "substring": "substring"}
"""Reported metric -> its per-question field in predictions.jsonl (values in [0, 1])."""


def bootstrap_interval(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = 0) -> Tuple[float, float, float]:
    """``(mean, low, high)`` of ``values``: the percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    [means] = _resampled_means(x, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _resampled_means(*columns: np.ndarray, resamples: int, seed: int) -> List[np.ndarray]:
    """Bootstrap means of each of ``columns`` (per-question values of equal length), ``[resamples]`` per
    column; the columns are resampled on the same questions (paired)."""
    rng = np.random.default_rng(seed)
    n = columns[0].size
    means = [np.empty(resamples) for _ in columns]
    for start in range(0, resamples, 1000):  # bounded memory for large n
        size = min(1000, resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        for column, out in zip(columns, means):
            out[start:start + size] = column[picks].mean(axis=1)
    return means


@dataclass
class PairedComparison:
    """System A minus system B on the same questions."""

    metric: str
    n: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - CONFIDENCE

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}

    def describe(self, scale: float = 100.0) -> str:
        return (f"{self.metric}: {scale * self.mean_a:.1f} vs {scale * self.mean_b:.1f}, difference "
                f"{scale * self.difference:+.1f} [{scale * self.low:+.1f}, {scale * self.high:+.1f}], "
                f"p={self.p_value:.3g} (n={self.n}{', significant' if self.significant else ''})")


def paired_comparison(a: Sequence[float], b: Sequence[float], *, metric: str = "", resamples: int = RESAMPLES,
                      seed: int = 0, confidence: float = CONFIDENCE) -> PairedComparison:
    """Mean of ``a - b``, its paired-bootstrap interval, and the two-sided sign-flip permutation p-value
    (the chance, were A and B exchangeable on every question, of a mean difference at least this large)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired comparison needs two equal-length, non-empty lists; got {x.shape} and {y.shape}")
    d = x - y
    [means] = _resampled_means(d, resamples=resamples, seed=seed)
    tail = (1 - confidence) / 2
    observed = abs(d.mean())
    rng = np.random.default_rng(seed + 1)
    extreme = 0
    for start in range(0, resamples, 1000):
        size = min(1000, resamples - start)
        signs = rng.integers(0, 2, size=(size, d.size)) * 2 - 1
        extreme += int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return PairedComparison(metric, int(d.size), float(x.mean()), float(y.mean()), float(d.mean()),
                            float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)),
                            (extreme + 1) / (resamples + 1))


def ratio_interval(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                   confidence: float = CONFIDENCE) -> Tuple[float, float, float]:
    """(mean(a) / mean(b), and its paired-bootstrap interval): the same questions resampled for both, so a
    goal such as "0.8 of text RAG's F1" is read with its uncertainty. NaN where b's mean is zero."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a ratio interval needs two equal-length, non-empty lists; got {x.shape} and {y.shape}")
    if y.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    numerators, denominators = _resampled_means(x, y, resamples=resamples, seed=seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = numerators / denominators
    tail = (1 - confidence) / 2
    ratios = ratios[np.isfinite(ratios)]
    return float(x.mean() / y.mean()), float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))


def intervals(per_question: Mapping[str, Sequence[float]], *, seed: int = 0, scale: float = 100.0) -> Dict[str, float]:
    """``{metric: mean, metric_ci95_low: ..., metric_ci95_high: ...}`` in percent, for each metric's
    per-question values (fractions)."""
    out: Dict[str, float] = {}
    for name, values in per_question.items():
        mean, low, high = bootstrap_interval(values, seed=seed)
        out[name], out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = scale * mean, scale * low, scale * high
    return out


def format_interval(metrics: Mapping[str, float], name: str) -> str:
    """``"F1=12.3 [9.8, 14.9]"``, or the bare value when the result has no interval."""
    value = metrics[name]
    low, high = metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
    if low is None or high is None:
        return f"{name}={value:.2f}"
    return f"{name}={value:.2f} [{low:.2f}, {high:.2f}]"


# --- predictions files ---------------------------------------------------------------------------
def read_predictions(path) -> Dict[str, dict]:
    """``predictions.jsonl`` (one line per question) by question id."""
    records: Dict[str, dict] = {}
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc}") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{path}:{number}: expected a predictions record with an 'id'")
        records[str(record["id"])] = record
    return records


def compare_records(a: Mapping[str, dict], b: Mapping[str, dict], *, metrics: Optional[Iterable[str]] = None,
                    seed: int = 0, names: Tuple[str, str] = ("A", "B")) -> List[PairedComparison]:
    """Paired comparisons of two systems' per-question records on the same question ids."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DataError(f"{names[0]} and {names[1]} were not evaluated on the same questions "
                        f"({len(only_a)} only in {names[0]}, e.g. {only_a[:2]}; {len(only_b)} only in {names[1]}, "
                        f"e.g. {only_b[:2]})")
    ids = sorted(a)
    _check_same_content(a, b, ids, names)
    out = []
    for metric in metrics or PER_QUESTION_METRICS:
        field = PER_QUESTION_METRICS.get(metric, metric)
        try:
            x = [float(a[i][field]) for i in ids]
            y = [float(b[i][field]) for i in ids]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"predictions lack the per-question field {field!r}") from None
        out.append(paired_comparison(x, y, metric=metric, seed=seed))
    return out


def content_digest(record: Mapping) -> Optional[str]:
    """sha256 of a question's text and its gold answers (their order aside): what makes two records with
    one id the same question. None when the record holds neither (a file of per-question scores only)."""
    if record.get("question") is None and record.get("answers") is None:
        return None
    answers = record.get("answers")
    answers = sorted(str(x) for x in answers) if isinstance(answers, (list, tuple)) else [str(answers)]
    text = json.dumps([str(record.get("question")), answers], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_same_content(a: Mapping[str, dict], b: Mapping[str, dict], ids, names: Tuple[str, str]) -> None:
    """Ids alone do not make the same questions: one id whose question or gold answers differ is refused."""
    digests = {i: (content_digest(a[i]), content_digest(b[i])) for i in ids}
    differ = [i for i, (x, y) in digests.items() if None not in (x, y) and x != y]
    if differ:
        raise DataError(f"{names[0]} and {names[1]} were not evaluated on the same questions: {len(differ)} of "
                        f"{len(ids)} question ids have another question text or other gold answers "
                        f"(e.g. {differ[:2]}); a paired test needs the same questions")


def compare_predictions(path_a, path_b, *, metrics: Optional[Iterable[str]] = None,
                        seed: int = 0) -> List[PairedComparison]:
    """Paired comparisons of two ``predictions.jsonl`` files (two systems, the same question ids)."""
    return compare_records(read_predictions(path_a), read_predictions(path_b), metrics=metrics, seed=seed,
                           names=(str(path_a), str(path_b)))
