"""Per-question analysis of an evaluation: what was asked, what was read, what was answered, and why
an answer went wrong.

It reads the ``predictions.jsonl`` every evaluation writes (pqa's and the controls'), so it covers
every question without loading a model. Each question has one outcome:

- ``correct``: the prediction matches a gold answer exactly (EM);
- ``reading_miss``: a gold document was among those read, yet the answer is wrong;
- ``retrieval_miss``: no gold document was read, and the answer is wrong.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from pqa_core.data.loading import Document, _field, _read_jsonl, load_corpus
from pqa_core.errors import DataError
from pqa_core.evaluation.metrics import compute_em, compute_f1

OUTCOMES = ("correct", "reading_miss", "retrieval_miss")


@dataclass
class ReadDocument:
    """One document read for a question, in rank order."""

    id: Any
    title: Optional[str]  # None when no corpus was given
    score: Optional[float]  # None for a control without scores
    gold: bool


@dataclass
class QuestionAnalysis:
    id: str
    question: str
    answers: List[str]  # the gold answers
    prediction: str
    selected: List[ReadDocument]
    gold_doc_ids: List[Any]
    gold_titles: List[Optional[str]]
    em: float  # percent, as the run's metrics
    f1: float
    correct: bool
    outcome: str  # one of OUTCOMES


@dataclass
class Analysis:
    questions: List[QuestionAnalysis]
    source: str = ""  # where the predictions came from
    notes: List[str] = field(default_factory=list)  # what could not be shown (e.g. titles without a corpus)

    @property
    def breakdown(self) -> Dict[str, Any]:
        """Counts and percentages of each outcome, over all questions."""
        total = len(self.questions)
        counts = {outcome: sum(q.outcome == outcome for q in self.questions) for outcome in OUTCOMES}
        return {"questions": total, **counts,
                "percent": {o: 100.0 * c / total if total else 0.0 for o, c in counts.items()}}

    def select(self, wrong: bool = False, outcome: Optional[str] = None, limit: Optional[int] = None
               ) -> List[QuestionAnalysis]:
        """The questions that are wrong (``wrong``) or have ``outcome``, the first ``limit`` of them."""
        chosen = [q for q in self.questions if (not wrong or not q.correct) and (outcome is None or q.outcome == outcome)]
        return chosen if limit is None else chosen[:limit]

    def to_dict(self, questions: Optional[Sequence[QuestionAnalysis]] = None) -> Dict[str, Any]:
        return {"source": self.source, "breakdown": self.breakdown, "notes": list(self.notes),
                "questions": [asdict(q) for q in (self.questions if questions is None else questions)]}


def read_predictions(path) -> List[Dict[str, Any]]:
    """The records of a predictions JSONL file; a malformed line is a ``DataError`` naming file and line.
    Files written before the gold field was renamed say ``gold_ids``; it is read as ``gold_doc_ids``."""
    records = []
    for line_no, obj in _read_jsonl(path, 1 << 24):
        where = f"{path}:{line_no}"
        if "gold_doc_ids" not in obj and "gold_ids" in obj:
            obj["gold_doc_ids"] = obj.pop("gold_ids")
        for name in ("question", "answers", "prediction", "selected_ids", "gold_doc_ids"):
            _field(obj, name, where)
        if not isinstance(obj["answers"], list) or not isinstance(obj["selected_ids"], list) \
                or not isinstance(obj["gold_doc_ids"], list):
            raise DataError(f"{where}: fields 'answers', 'selected_ids' and 'gold_doc_ids' must be lists")
        _check_scores(obj, where)
        records.append(obj)
    return records


def _check_scores(obj: Dict[str, Any], where: str) -> None:
    """Per-question scores are fractions (``em``, ``f1``, ``substring`` in [0, 1]) and ``scores`` one number
    per selected document: a string or a 7 would be shown as a score of 700."""
    for name in ("em", "f1", "substring"):
        value = obj.get(name)
        if name in obj and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not 0.0 <= value <= 1.0):
            raise DataError(f"{where}: field {name!r} = {value!r}: must be a number in [0, 1]")
    scores = obj.get("scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(obj["selected_ids"]) or any(
            isinstance(x, bool) or not isinstance(x, (int, float, type(None))) for x in scores)):
        raise DataError(f"{where}: field 'scores' must be a list of numbers, one per selected document "
                        f"({len(obj['selected_ids'])})")


def _titles(corpus: Union[None, str, Path, Sequence[Document]]) -> Optional[Dict[str, str]]:
    if corpus is None:
        return None
    documents = load_corpus(corpus) if isinstance(corpus, (str, Path)) else corpus
    return {str(doc.doc_id): doc.title for doc in documents}


def analyze_predictions(predictions: Union[str, Path, Iterable[Mapping[str, Any]]],
                        corpus: Union[None, str, Path, Sequence[Document]] = None,
                        source: Optional[str] = None) -> Analysis:
    """Analyse an evaluation's predictions (a ``predictions.jsonl`` path, or its records): per question
    the question, gold answers, prediction, documents read (titles from ``corpus``, a path or a list of
    ``Document``) with scores, gold documents, EM/F1 and the outcome (``OUTCOMES``)."""
    if isinstance(predictions, (str, Path)):
        source = source or str(predictions)
        predictions = read_predictions(predictions)
    titles = _titles(corpus)
    questions = []
    for record in predictions:
        answers = list(record["answers"])
        prediction = str(record["prediction"])
        gold = [doc_id for doc_id in record["gold_doc_ids"]]
        gold_keys = {str(doc_id) for doc_id in gold}
        scores = record.get("scores") or [None] * len(record["selected_ids"])
        selected = [ReadDocument(doc_id, titles.get(str(doc_id)) if titles else None,
                                 None if score is None else float(score), str(doc_id) in gold_keys)
                    for doc_id, score in zip(record["selected_ids"], scores)]
        em = 100.0 * float(record["em"] if "em" in record else compute_em(prediction, answers))
        f1 = 100.0 * float(record["f1"] if "f1" in record else compute_f1(prediction, answers))
        correct = em > 0
        outcome = "correct" if correct else "reading_miss" if any(d.gold for d in selected) else "retrieval_miss"
        questions.append(QuestionAnalysis(
            id=str(record.get("id", len(questions))), question=str(record["question"]), answers=answers,
            prediction=prediction, selected=selected, gold_doc_ids=gold,
            gold_titles=[titles.get(str(doc_id)) if titles else None for doc_id in gold],
            em=em, f1=f1, correct=correct, outcome=outcome))
    notes = [] if titles is not None else ["no corpus given: documents are shown by id only"]
    return Analysis(questions, source or "(records)", notes)
