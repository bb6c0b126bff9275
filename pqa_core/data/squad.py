"""SQuAD v1.1 / v2.0 JSON -> pqa's ``corpus.jsonl`` and ``qa_{train,dev,test}.jsonl``.

One document per paragraph (``doc_id`` 0.. in file order, ``title`` and ``text`` exactly as
written), one question per ``qas`` entry (``id``, ``question`` as written, ``answers``: every
answer text, deduplicated in first-seen order, ``gold_doc_ids``: its paragraph). This is how
``shared/data/squad_v1.1`` was derived, so importing the official file gives the same bytes.

SQuAD v2.0's unanswerable questions (``is_impossible: true``) have no answer that pqa's
format can hold; they are skipped and counted, as are questions whose text is empty.
Everything else that does not look like SQuAD is a :class:`DataError` naming the file and
the JSON path (``$.data[3].paragraphs[0].qas[2].answers[0].text``).

Splits are deterministic functions of (seed, ids), independent of the machine and process:

- ``article``: whole articles are held out. Articles are ranked by a stable hash of
  (seed, title); the first ``round(test_fraction * articles)`` go to test, the next
  ``round(dev_fraction * articles)`` to dev (each at least one when its fraction is > 0),
  the rest to train. No passage of a dev/test article has a training question.
- ``question``: every passage stays in training and only some of its questions are held out.
  Within each passage, questions are ranked by a stable hash of (seed, id) and the r-th of n
  gets the point ``(r + offset) / n`` (``offset`` a stable hash of the passage in [0, 1)):
  test when the point is below ``test_fraction``, dev below ``test_fraction + dev_fraction``,
  else train. So each passage gives test ``floor`` or ``ceil`` of ``test_fraction * n``
  questions and the totals match the fractions closely; a passage with two or more questions
  always keeps at least one in train.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pqa_core.storage.atomic import atomic_file, sha256_file
from pqa_core.errors import DataError, UsageError

SPLIT_MODES = ("article", "question")
SPLITS = ("train", "dev", "test")
OUTPUT_FILES = {"corpus": "corpus.jsonl", "train": "qa_train.jsonl", "dev": "qa_dev.jsonl",
                "test": "qa_test.jsonl", "meta": "import.json"}

_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def _type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass
class SquadData:
    """The converted content of one SQuAD file."""

    documents: List[dict]  # {"doc_id", "title", "text"}
    questions: List[dict]  # {"id", "question", "answers", "gold_doc_ids"}
    article_of_doc: List[int]  # article index of each document
    article_titles: List[str]
    version: Optional[str] = None
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> questions left out


class _Reader:
    """Type checks that name the file and the JSON path of the offending value."""

    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, message: str) -> DataError:
        return DataError(f"{self.source}: {path}: {message}")

    def get(self, obj: dict, key: str, path: str):
        if key not in obj:
            raise self.error(path, f"missing field '{key}'")
        return obj[key]

    def expect(self, value, kind, path: str, what: str):
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.error(path, f"expected {what}, got {_type_name(value)}")
        return value


def load_squad_json(path) -> dict:
    """The parsed JSON of a SQuAD file; unreadable or invalid JSON is a one-line DataError."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None


def convert_squad(obj, source: str = "<input>") -> SquadData:
    """SQuAD's ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`` -> SquadData."""
    r = _Reader(source)
    r.expect(obj, dict, "$", "an object with a 'data' array (SQuAD format)")
    version = obj.get("version")
    if version is not None and not isinstance(version, str):
        raise r.error("$.version", f"expected a string, got {_type_name(version)}")
    articles = r.expect(r.get(obj, "data", "$"), list, "$.data", "an array of articles")
    documents: List[dict] = []
    questions: List[dict] = []
    article_of_doc: List[int] = []
    titles: List[str] = []
    skipped: Dict[str, int] = {}
    first_seen: Dict[str, str] = {}
    for a, article in enumerate(articles):
        apath = f"$.data[{a}]"
        r.expect(article, dict, apath, "an article object")
        title = r.expect(r.get(article, "title", apath), str, f"{apath}.title", "a string")
        titles.append(title)
        paragraphs = r.expect(r.get(article, "paragraphs", apath), list, f"{apath}.paragraphs", "an array")
        for p, paragraph in enumerate(paragraphs):
            ppath = f"{apath}.paragraphs[{p}]"
            r.expect(paragraph, dict, ppath, "a paragraph object")
            context = r.expect(r.get(paragraph, "context", ppath), str, f"{ppath}.context", "a string")
            if not context.strip():
                raise r.error(f"{ppath}.context", "empty passage")
            doc_id = len(documents)
            documents.append({"doc_id": doc_id, "title": title, "text": context})
            article_of_doc.append(a)
            qas = r.expect(r.get(paragraph, "qas", ppath), list, f"{ppath}.qas", "an array")
            for q, qa in enumerate(qas):
                qpath = f"{ppath}.qas[{q}]"
                item = _convert_question(r, qa, qpath, doc_id, skipped)
                if item is None:
                    continue
                if item["id"] in first_seen:
                    raise r.error(f"{qpath}.id", f"duplicate question id {item['id']!r} (first at {first_seen[item['id']]})")
                first_seen[item["id"]] = qpath
                questions.append(item)
    if not documents:
        raise DataError(f"{source}: $.data: no paragraphs")
    return SquadData(documents, questions, article_of_doc, titles, version, skipped)


def _convert_question(r: _Reader, qa, qpath: str, doc_id: int, skipped: Dict[str, int]) -> Optional[dict]:
    r.expect(qa, dict, qpath, "a question object")
    qid = r.get(qa, "id", qpath)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise r.error(f"{qpath}.id", f"expected a string, got {_type_name(qid)}")
    qid = str(qid)
    question = r.expect(r.get(qa, "question", qpath), str, f"{qpath}.question", "a string")
    impossible = qa.get("is_impossible", False)
    r.expect(impossible, bool, f"{qpath}.is_impossible", "true or false")
    answers = r.expect(r.get(qa, "answers", qpath), list, f"{qpath}.answers", "an array")
    texts: List[str] = []
    for i, answer in enumerate(answers):
        apath = f"{qpath}.answers[{i}]"
        r.expect(answer, dict, apath, "an answer object")
        text = r.expect(r.get(answer, "text", apath), str, f"{apath}.text", "a string")
        if text.strip() and text not in texts:
            texts.append(text)
    if impossible:
        skipped["unanswerable"] = skipped.get("unanswerable", 0) + 1
        return None
    if not question.strip():
        skipped["empty_question"] = skipped.get("empty_question", 0) + 1
        return None
    if not texts:
        raise r.error(f"{qpath}.answers", "no non-empty answer text (and the question is not marked is_impossible)")
    return {"id": qid, "question": question, "answers": texts, "gold_doc_ids": [doc_id]}


def read_squad(path) -> SquadData:
    """Load and convert one SQuAD v1.1 / v2.0 JSON file."""
    return convert_squad(load_squad_json(path), source=str(path))


# ---------------------------------------------------------------- splits

def _unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) that is the same in every process for (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def _check_fractions(dev_fraction: float, test_fraction: float) -> None:
    for name, value in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{name}={value}: expected 0 <= {name} < 1")
    if dev_fraction + test_fraction >= 1.0:
        raise UsageError(f"dev_fraction + test_fraction = {dev_fraction + test_fraction}: must be below 1 "
                         f"(something has to stay for training)")


def assign_splits(data: SquadData, mode: str = "article", dev_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0) -> List[str]:
    """The split ("train" / "dev" / "test") of each question of ``data``, in order."""
    if mode not in SPLIT_MODES:
        raise UsageError(f"split mode {mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    _check_fractions(dev_fraction, test_fraction)
    if mode == "article":
        return _split_by_article(data, dev_fraction, test_fraction, seed)
    return _split_by_question(data, dev_fraction, test_fraction, seed)


def _split_by_article(data: SquadData, dev_fraction: float, test_fraction: float, seed: int) -> List[str]:
    keys = sorted(set(data.article_titles))  # articles sharing a title are held out together
    n = len(keys)
    counts = []
    for fraction in (test_fraction, dev_fraction):
        k = _round_half_up(fraction * n)
        counts.append(max(k, 1) if fraction > 0 else 0)
    n_test, n_dev = counts
    if n_test + n_dev >= n:
        raise UsageError(f"split by article: {n} article(s) cannot give {n_test} test and {n_dev} dev article(s) "
                         f"and keep one for training; lower the fractions or use --split-mode question")
    ranked = sorted(keys, key=lambda key: (_unit_hash(seed, "article:" + key), key))
    split_of_key = {key: "test" for key in ranked[:n_test]}
    split_of_key.update({key: "dev" for key in ranked[n_test:n_test + n_dev]})
    split_of_doc = [split_of_key.get(data.article_titles[a], "train") for a in data.article_of_doc]
    return [split_of_doc[q["gold_doc_ids"][0]] for q in data.questions]


def _split_by_question(data: SquadData, dev_fraction: float, test_fraction: float, seed: int) -> List[str]:
    by_doc: Dict[int, List[int]] = {}
    for i, q in enumerate(data.questions):
        by_doc.setdefault(q["gold_doc_ids"][0], []).append(i)
    splits = ["train"] * len(data.questions)
    for doc_id, positions in by_doc.items():
        ranked = sorted(positions, key=lambda i: (_unit_hash(seed, "question:" + data.questions[i]["id"]),
                                                  data.questions[i]["id"]))
        n = len(ranked)
        offset = _unit_hash(seed, f"passage:{doc_id}")
        for rank, i in enumerate(ranked):
            point = (rank + offset) / n
            splits[i] = "test" if point < test_fraction else "dev" if point < test_fraction + dev_fraction \
                else "train"
        if n >= 2 and all(splits[i] != "train" for i in ranked):
            splits[ranked[-1]] = "train"
    return splits


# ---------------------------------------------------------------- writing

def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_atomically(files: Dict[Path, str]) -> None:
    """Write every file to a temporary name first, then rename them all; on error nothing changes."""
    with contextlib.ExitStack() as stack:  # each temp file replaces its target as the stack closes
        for path, text in files.items():
            with open(stack.enter_context(atomic_file(path, fsync=True)), "w", encoding="utf-8", newline="\n") as f:
                f.write(text)


def import_squad(file, out_dir, *, mode: str = "article", dev_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0) -> dict:
    """Convert ``file`` and write corpus.jsonl, qa_train/dev/test.jsonl and import.json into ``out_dir``.

    Returns the summary that ``import.json`` holds. Nothing is written when the input is bad.
    """
    _check_fractions(dev_fraction, test_fraction)
    if mode not in SPLIT_MODES:
        raise UsageError(f"split mode {mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    data = read_squad(file)
    splits = assign_splits(data, mode, dev_fraction, test_fraction, seed)
    out = Path(out_dir)
    parts = {name: [q for q, s in zip(data.questions, splits) if s == name] for name in SPLITS}
    summary = {
        "source": os.path.basename(str(file)),
        "source_sha256": sha256_file(file),
        "squad_version": data.version,
        "split_mode": mode,
        "dev_fraction": dev_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "articles": len(data.article_titles),
        "documents": len(data.documents),
        "questions": {name: len(rows) for name, rows in parts.items()},
        "articles_per_split": {name: len({data.article_of_doc[q["gold_doc_ids"][0]] for q in rows})
                               for name, rows in parts.items()},
        "skipped": dict(sorted(data.skipped.items())),
        "files": {key: OUTPUT_FILES[key] for key in ("corpus", "train", "dev", "test")},
    }
    files = {out / OUTPUT_FILES["corpus"]: _jsonl(data.documents)}
    for name in SPLITS:
        files[out / OUTPUT_FILES[name]] = _jsonl(parts[name])
    files[out / OUTPUT_FILES["meta"]] = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    try:
        write_atomically(files)
    except OSError as exc:
        raise DataError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return summary
