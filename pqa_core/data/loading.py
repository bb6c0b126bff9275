"""Corpus and question files, train/eval splits, and the two datasets training reads.

Files are JSONL, one object per line. Loading is strict: every problem raises a
``DataError`` naming file, line and field, because a silently skipped or
misread line would quietly change what an experiment measured.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from pqa_core.config import DataSettings
from pqa_core.errors import DataError, UsageError

DocId = Union[int, str]

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest accepted line; longer lines are rejected after reading at most this many bytes of them."""

SPLIT_MODES = ("question", "document")
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"


@dataclass
class Document:
    doc_id: DocId
    title: str
    text: str
    part: int = 0
    """Which piece of its passage this is (a passage longer than ``data.max_doc_tokens`` is split)."""


@dataclass
class QAExample:
    id: str
    question: str
    answers: List[str]
    gold_doc_ids: List[DocId]
    gold_rows: List[int] = field(default_factory=list)
    """Row indices of ``gold_doc_ids`` in the corpus list; ``load_qa`` fills them."""


def sample_data_path(name: str) -> Path:
    """A file of the small original dataset bundled with pqa (corpus.jsonl, qa_train.jsonl, qa_eval.jsonl)."""
    path = SAMPLE_DATA_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in SAMPLE_DATA_DIR.glob("*") if p.is_file())
        raise UsageError(f"no sample data file {name!r}; available: {', '.join(available)}")
    return path


# ---------------------------------------------------------------- reading JSONL

_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
                    bool: "boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _read_jsonl(path, max_line_bytes: int) -> Iterator[Tuple[int, dict]]:
    """Yield ``(1-based line number, object)`` per non-blank line.

    Reads bytes with a bounded ``readline`` so an enormous line costs at most
    ``max_line_bytes`` of memory before it is rejected, and decodes line by line
    so a bad byte is reported with its line.
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with handle:
        line_no = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            where = f"{path}:{line_no}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise DataError(f"{where}: line is longer than the limit of {max_line_bytes} bytes "
                                f"(pqa_core.data.loading.MAX_LINE_BYTES)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte column "
                                f"{exc.start + 1})") from None
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:
                detail = f"{exc.msg.removesuffix(' at')} at column {exc.colno}" \
                    if isinstance(exc, json.JSONDecodeError) else str(exc)  # json's msg may end in "at"
                raise DataError(f"{where}: invalid JSON: {detail}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}")
            yield line_no, obj


def _field(obj: dict, name: str, where: str):
    if name not in obj:
        raise DataError(f"{where}: missing field '{name}'")
    return obj[name]


def _string(value, name: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}': empty string")
    return value


def _doc_id(value, name: str, where: str) -> DocId:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: field '{name}': expected an integer or string doc id, got {_json_type(value)}")
    return value


def _string_list(value, name: str, where: str) -> List[str]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}': expected a list of strings, got {_json_type(value)}")
    if not value:
        raise DataError(f"{where}: field '{name}': empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{where}: field '{name}': item {i} is {_json_type(item)}, expected a string")
        if not item.strip():
            raise DataError(f"{where}: field '{name}': item {i} is an empty string")
    return list(value)


# ---------------------------------------------------------------- corpus and questions

def load_corpus(path, max_line_bytes: int = MAX_LINE_BYTES) -> List[Document]:
    """Documents ``{doc_id, title?, text}``; a document's row is its position in the returned list."""
    documents: List[Document] = []
    first_line: Dict[DocId, int] = {}
    for line_no, obj in _read_jsonl(path, max_line_bytes):
        where = f"{path}:{line_no}"
        doc_id = _doc_id(_field(obj, "doc_id", where), "doc_id", where)
        if doc_id in first_line:
            raise DataError(f"{where}: field 'doc_id': duplicate doc id {doc_id!r} "
                            f"(first on line {first_line[doc_id]})")
        if documents and type(doc_id) is not type(documents[0].doc_id):
            kinds = {int: "an integer", str: "a string"}
            raise DataError(f"{where}: field 'doc_id': {doc_id!r} is {kinds[type(doc_id)]} but the first doc id "
                            f"({documents[0].doc_id!r}, line {first_line[documents[0].doc_id]}) is "
                            f"{kinds[type(documents[0].doc_id)]}; a corpus's doc ids are all integers or all strings")
        first_line[doc_id] = line_no
        title = _string(obj.get("title", ""), "title", where, allow_empty=True)
        text = _string(_field(obj, "text", where), "text", where)
        documents.append(Document(doc_id, title, text))
    if not documents:
        raise DataError(f"{path}: corpus is empty")
    return documents


def load_qa(path, corpus: Sequence[Document], max_line_bytes: int = MAX_LINE_BYTES) -> List[QAExample]:
    """Questions ``{id, question, answers, gold_doc_ids}`` with gold doc ids mapped to corpus rows.

    The older seed format ``{question, answer, gold_doc_ids}`` is accepted too: ``answer``
    becomes ``answers=[answer]`` and a missing ``id`` becomes ``"<file name>:<line>"``.
    """
    row_of = {doc.doc_id: row for row, doc in enumerate(corpus)}
    examples: List[QAExample] = []
    first_line: Dict[str, int] = {}
    for line_no, obj in _read_jsonl(path, max_line_bytes):
        where = f"{path}:{line_no}"
        qid = _string(obj["id"], "id", where) if "id" in obj else f"{Path(path).name}:{line_no}"
        if qid in first_line:
            raise DataError(f"{where}: field 'id': duplicate question id {qid!r} (first on line {first_line[qid]})")
        first_line[qid] = line_no
        question = _string(_field(obj, "question", where), "question", where)
        answers = _answers(obj, where)
        gold_doc_ids, gold_rows = _gold(obj, row_of, len(corpus), where)
        examples.append(QAExample(qid, question, answers, gold_doc_ids, gold_rows))
    if not examples:
        raise DataError(f"{path}: file has no questions")
    return examples


def _answers(obj: dict, where: str) -> List[str]:
    if "answers" in obj and "answer" in obj:
        raise DataError(f"{where}: field 'answer': given together with 'answers'; keep one")
    if "answers" not in obj and "answer" in obj:
        return [_string(obj["answer"], "answer", where)]
    return _string_list(_field(obj, "answers", where), "answers", where)


def _gold(obj: dict, row_of: Dict[DocId, int], num_docs: int, where: str) -> Tuple[List[DocId], List[int]]:
    value = _field(obj, "gold_doc_ids", where)
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'gold_doc_ids': expected a list of doc ids, got {_json_type(value)}")
    if not value:
        raise DataError(f"{where}: field 'gold_doc_ids': empty list (a question needs at least one gold document)")
    rows: List[int] = []
    for doc_id in value:
        _doc_id(doc_id, "gold_doc_ids", where)
        if doc_id not in row_of:
            raise DataError(f"{where}: field 'gold_doc_ids': doc id {doc_id!r} is not in the corpus "
                            f"({num_docs} documents)")
        if row_of[doc_id] in rows:
            raise DataError(f"{where}: field 'gold_doc_ids': doc id {doc_id!r} is listed twice")
        rows.append(row_of[doc_id])
    return list(value), rows


# ---------------------------------------------------------------- splits

def _stable_hash(seed: int, key: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest(), "big")


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def split_examples(examples: Sequence[QAExample], mode: str, eval_fraction: float = 0.25,
                   seed: int = 0) -> Tuple[List[QAExample], List[QAExample]]:
    """Deterministic ``(train, eval)`` split; both keep the input order.

    - ``"question"``: every document keeps its place in training and only some of its
      questions are held out: per document (its first gold doc), ``round(fraction * n)``
      questions, lowest hash of (seed, question id) first, but never all of a document's
      questions when it has two or more. This measures answering unseen questions about seen documents.
    - ``"document"``: ``round(fraction * number of documents)`` whole documents (at least one,
      never all, when there are two or more) are held out; a question goes to eval when any
      of its gold documents is held out, so no training question touches a held-out document.
    """
    if mode not in SPLIT_MODES:
        raise UsageError(f"split mode {mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise UsageError(f"eval_fraction={eval_fraction}: expected 0 <= eval_fraction < 1")
    if mode == "question":
        held_out = _held_out_questions(examples, eval_fraction, seed)
    else:
        held_out = _questions_of_held_out_documents(examples, eval_fraction, seed)
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    evaluation = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, evaluation


def _held_out_questions(examples: Sequence[QAExample], fraction: float, seed: int) -> set:
    by_doc: Dict[object, List[int]] = {}
    for i, ex in enumerate(examples):
        by_doc.setdefault(repr(ex.gold_doc_ids[0]) if ex.gold_doc_ids else None, []).append(i)
    held_out = set()
    for positions in by_doc.values():
        n_eval = _round_half_up(fraction * len(positions))
        if len(positions) >= 2:
            n_eval = min(n_eval, len(positions) - 1)
        ranked = sorted(positions, key=lambda i: (_stable_hash(seed, examples[i].id), i))
        held_out.update(ranked[:n_eval])
    return held_out


def _questions_of_held_out_documents(examples: Sequence[QAExample], fraction: float, seed: int) -> set:
    doc_keys = sorted({repr(d) for ex in examples for d in ex.gold_doc_ids})
    n_eval = _round_half_up(fraction * len(doc_keys))
    if len(doc_keys) >= 2 and fraction > 0:
        n_eval = min(max(n_eval, 1), len(doc_keys) - 1)
    ranked = sorted(doc_keys, key=lambda key: (_stable_hash(seed, key), key))
    held_docs = set(ranked[:n_eval])
    return {i for i, ex in enumerate(examples) if any(repr(d) in held_docs for d in ex.gold_doc_ids)}


# ---------------------------------------------------------------- padding

def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` long tensors padded to the longest sequence on ``side``.

    Left padding puts every sequence's last token in the last column, which is what a
    causal LM continues from; right padding suits targets.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    tensors = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    if not tensors:
        raise UsageError("cannot collate an empty batch")
    lengths = torch.tensor([t.numel() for t in tensors])
    if side == "left":
        tensors = [t.flip(0) for t in tensors]
    ids = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)
    positions = torch.arange(ids.shape[1])
    mask = (positions < lengths[:, None]).long()
    if side == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    return ids, mask


def _token_ids(tokenizer, texts: List[str]) -> List[List[int]]:
    """Plain token ids, no special tokens: the model decides where soft prompts and BOS go."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos token; pqa marks the end of documents and answers with it")
    return tokenizer.eos_token_id


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


# ---------------------------------------------------------------- datasets

@dataclass
class DocumentRows:
    """The rows of ``doc_vectors``: every passage of the corpus, a passage longer than ``max_tokens``
    split into near-equal pieces that keep its doc id (``Document.part`` numbers them). Nothing is cut:
    every token of every passage is in some row."""

    documents: List[Document]  # one per row
    tokens: List[List[int]]  # a row's text tokens, no eos
    passage_of_row: List[int]  # row -> corpus index
    rows_of_passage: List[List[int]]  # corpus index -> rows
    max_tokens: int

    @property
    def split_passages(self) -> int:
        return sum(len(rows) > 1 for rows in self.rows_of_passage)

    def describe(self) -> str:
        longest = max(len(t) for t in self.tokens) if self.tokens else 0
        return (f"{len(self.rows_of_passage)} passages -> {len(self.documents)} documents (rows of doc_vectors); "
                f"{self.split_passages} passages longer than {self.max_tokens} tokens were split; "
                f"longest row {longest} tokens")


def split_passages(corpus: Sequence[Document], tokenizer, max_tokens: int) -> DocumentRows:
    """Each passage as one row, or, when longer than ``max_tokens`` tokens, as ``ceil(n / max_tokens)``
    rows of near-equal length (so no piece is a stub)."""
    if max_tokens < 1:
        raise UsageError(f"data.max_doc_tokens={max_tokens}: expected >= 1")
    documents: List[Document] = []
    tokens: List[List[int]] = []
    passage_of_row: List[int] = []
    rows_of_passage: List[List[int]] = []
    for index, (doc, ids) in enumerate(zip(corpus, _token_ids(tokenizer, [d.text for d in corpus]))):
        pieces = max(1, -(-len(ids) // max_tokens))
        bounds = [round(i * len(ids) / pieces) for i in range(pieces + 1)]
        rows_of_passage.append([])
        for part in range(pieces):
            piece = ids[bounds[part]:bounds[part + 1]]
            text = doc.text if pieces == 1 else tokenizer.decode(piece)
            rows_of_passage[-1].append(len(documents))
            documents.append(Document(doc.doc_id, doc.title, text, part))
            tokens.append(piece)
            passage_of_row.append(index)
    return DocumentRows(documents, tokens, passage_of_row, rows_of_passage, max_tokens)


class WritePhaseDataset(torch.utils.data.Dataset):
    """One item per row of ``doc_vectors``, for learning its latent: its text tokens then eos.

    ``corpus`` is a list of passages (split here at ``max_length`` tokens, see ``split_passages``)
    or an already split ``DocumentRows``.
    """

    def __init__(self, corpus, tokenizer, max_length: int = 256):
        self.rows = corpus if isinstance(corpus, DocumentRows) else split_passages(corpus, tokenizer, max_length)
        self.corpus = self.rows.documents
        self.tokenizer = tokenizer
        eos = _eos_id(tokenizer)
        self.doc_ids = [list(ids) + [eos] for ids in self.rows.tokens]

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, row: int) -> dict:
        return {"doc_row": row, "doc_ids": self.doc_ids[row]}

    def collate(self, batch: List[dict]) -> Dict[str, torch.Tensor]:
        """``doc_row [B]``, ``doc_ids``/``doc_mask [B, L]`` right-padded to the longest in the batch."""
        doc_ids, doc_mask = pad_sequences([item["doc_ids"] for item in batch], _pad_id(self.tokenizer), "right")
        return {"doc_row": torch.tensor([item["doc_row"] for item in batch], dtype=torch.long),
                "doc_ids": doc_ids, "doc_mask": doc_mask}


class ReadPhaseDataset(torch.utils.data.Dataset):
    """One item per question: the prompt the LLM reads, the answer it must produce, gold rows.

    ``rows`` (the corpus split into ``doc_vectors`` rows) maps gold passages to the rows holding them;
    without it each passage is one row.

    The training target is ``answers[0]`` as ``" " + answer`` tokens (at most
    ``max_answer_length``) then eos. Over-long prompts keep their last
    ``max_query_length`` tokens so the ``Answer:`` cue survives. With ``teacher_corpus``
    each item also carries the prompt preceded by its gold passages as text, for
    distillation; an over-long passage loses its beginning, never the prompt.
    """

    def __init__(self, examples: Sequence[QAExample], tokenizer, encoder_tokenizer=None,
                 max_query_length: int = DataSettings.max_query_tokens,
                 max_answer_length: int = DataSettings.max_answer_tokens, prompt: str = DataSettings.prompt,
                 teacher_corpus: Optional[Sequence[Document]] = None, max_teacher_length: int = 256,
                 rows: Optional[DocumentRows] = None):
        if "{question}" not in prompt:
            raise UsageError(f"prompt {prompt!r} must contain '{{question}}'")
        for ex in examples:
            if not ex.answers:
                raise UsageError(f"question {ex.id!r} has no answers")
            if len(ex.gold_rows) != len(ex.gold_doc_ids):
                raise UsageError(f"question {ex.id!r}: gold_rows do not match gold_doc_ids; load it with load_qa")
        self.examples = examples
        self.tokenizer = tokenizer
        self.encoder_tokenizer = encoder_tokenizer
        self.rows = rows
        self.passage_of_row = None if rows is None else torch.tensor(rows.passage_of_row, dtype=torch.long)
        self.max_query_length = max_query_length
        eos = _eos_id(tokenizer)
        prompts = [prompt.replace("{question}", ex.question) for ex in examples]  # no str.format: braces stay literal
        self.query_ids = [ids[-max_query_length:] for ids in _token_ids(tokenizer, prompts)]
        answers = _token_ids(tokenizer, [" " + ex.answers[0] for ex in examples])
        self.answer_ids = [ids[:max_answer_length] + [eos] for ids in answers]
        self.teacher_ids = None
        if teacher_corpus is not None:
            self.teacher_ids = self._teacher_ids(teacher_corpus, prompts, max_teacher_length)

    def _teacher_ids(self, corpus: Sequence[Document], prompts: List[str], max_length: int) -> List[List[int]]:
        for ex in self.examples:
            bad = [row for row in ex.gold_rows if not 0 <= row < len(corpus)]
            if bad:
                raise DataError(f"question {ex.id!r}: gold row {bad[0]} is outside the teacher corpus "
                                f"({len(corpus)} documents)")
        # "Context:" + " passage" + "\nprompt" tokenize the same apart as together (BPE splits before spaces/newlines)
        head = _token_ids(self.tokenizer, ["Context:"])[0]
        passages = _token_ids(self.tokenizer, [" " + "\n".join(corpus[r].text for r in ex.gold_rows)
                                               for ex in self.examples])
        tails = _token_ids(self.tokenizer, ["\n" + p for p in prompts])
        out = []
        for passage, tail in zip(passages, tails):
            budget = max(max_length - len(head) - len(tail), 0)
            ids = head + (passage[-budget:] if budget else []) + tail
            out.append(ids[-max_length:])
        return out

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "query_ids": self.query_ids[index], "answer_ids": self.answer_ids[index],
                "gold_rows": self.examples[index].gold_rows}
        if self.teacher_ids is not None:
            item["teacher_ids"] = self.teacher_ids[index]
        return item

    def collate(self, batch: List[dict]) -> Dict[str, torch.Tensor]:
        """Tensors padded to the longest item in the batch:

        ``index [B]`` and ``example_ids`` (question ids, for error messages); ``query_ids``/``query_mask [B, Lq]`` left-padded; ``answer_ids``/``answer_mask
        [B, La]`` right-padded; ``encoder_ids``/``encoder_mask`` (the encoder tokenizer's own ids and
        padding, else the query tensors); ``gold_doc_ids [B, G]`` the ``doc_vectors`` rows holding the gold
        passages, padded with -1 (what the retrieval loss marks gold); ``gold_passages`` the gold corpus rows
        (what Recall@k counts: a passage split over several rows is found when any of them is selected);
        with a teacher corpus, ``teacher_ids``/``teacher_mask [B, Lt]`` left-padded.
        """
        pad = _pad_id(self.tokenizer)
        out = {"index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
               "example_ids": [self.examples[item["index"]].id for item in batch]}
        out["query_ids"], out["query_mask"] = pad_sequences([item["query_ids"] for item in batch], pad, "left")
        out["answer_ids"], out["answer_mask"] = pad_sequences([item["answer_ids"] for item in batch], pad, "right")
        if self.encoder_tokenizer is None:
            out["encoder_ids"], out["encoder_mask"] = out["query_ids"], out["query_mask"]
        else:
            encoded = self.encoder_tokenizer([self.examples[item["index"]].question for item in batch],
                                             padding=True, truncation=True, max_length=self.max_query_length,
                                             return_tensors="pt")
            out["encoder_ids"] = encoded["input_ids"].long()
            out["encoder_mask"] = encoded["attention_mask"].long()
        passages = [item["gold_rows"] for item in batch]
        out["gold_passages"] = _pad_gold(passages)
        out["gold_doc_ids"] = out["gold_passages"] if self.rows is None else _pad_gold(
            [[r for p in gold for r in self.rows.rows_of_passage[p]] for gold in passages])
        if self.teacher_ids is not None:
            out["teacher_ids"], out["teacher_mask"] = pad_sequences([item["teacher_ids"] for item in batch],
                                                                    pad, "left")
        return out


def _pad_gold(rows: List[List[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)  # rows are never empty (load_qa refuses that)
    return torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def gold_mask(gold_doc_ids: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Boolean ``[B, num_docs]`` mask of each question's gold rows, from ``[B, G]`` rows padded with -1.

    Padding scatters into an extra column that is then cut off, so no loop is needed.
    """
    if gold_doc_ids.dim() != 2:
        raise ValueError(f"gold_doc_ids must be [B, G], got shape {tuple(gold_doc_ids.shape)}")
    bad = (gold_doc_ids >= num_docs) | (gold_doc_ids < -1)
    if bad.any():
        position, column = (int(v) for v in bad.nonzero()[0])
        raise DataError(f"gold_mask: example position {position} has gold row "
                        f"{int(gold_doc_ids[position, column])}, outside 0..{num_docs - 1} ({num_docs} documents)")
    batch = gold_doc_ids.shape[0]
    target = torch.where(gold_doc_ids < 0, torch.full_like(gold_doc_ids, num_docs), gold_doc_ids)
    mask = torch.zeros(batch, num_docs + 1, dtype=torch.bool, device=gold_doc_ids.device)
    mask.scatter_(1, target.long(), True)
    return mask[:, :num_docs]
