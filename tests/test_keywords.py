"""Which words a document's soft tokens start from (``model.keyword_scoring``)."""
from __future__ import annotations

import pytest

from pqa_core.modeling.keywords import is_name_or_number, salient_token_ids
from pqa_core.modeling.llm import load_tokenizer

# "zorbic" and "Halvorsen" are each in one passage (same idf); "Halvorsen" is a name said twice.
PASSAGES = [
    "The zorbic method was tested by Halvorsen in the lab, and Halvorsen kept the notes.",
    "The method was tested in the lab, and the lab kept the notes.",
    "Tested notes from the lab.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _words(tokenizer, ids):
    return tokenizer.decode(ids).split()


def test_names_said_often_come_before_a_rare_common_word(tokenizer):
    budget = len(tokenizer(" Halvorsen", add_special_tokens=False)["input_ids"])
    (names_first, *_), (rarest_first, *_) = (salient_token_ids(PASSAGES, tokenizer, budget, scoring)
                                             for scoring in ("tfidf_names", "idf"))
    assert _words(tokenizer, names_first) == ["Halvorsen"]
    assert "Halvorsen" not in _words(tokenizer, rarest_first)  # idf alone: the earlier of two equally rare words


def test_a_capital_opening_a_sentence_is_not_a_name_but_a_digit_always_counts():
    text = "Ships left. Boats stayed near Osterby in 1712."
    assert not is_name_or_number("Ships", 0, text)
    assert not is_name_or_number("Boats", text.index("Boats"), text)
    assert is_name_or_number("Osterby", text.index("Osterby"), text)
    assert is_name_or_number("1712", text.index("1712"), text)
    assert not is_name_or_number("near", text.index("near"), text)


def test_every_scoring_keeps_the_budget_text_order_and_no_stop_word(tokenizer):
    for scoring in ("tfidf_names", "idf"):
        ids = salient_token_ids(PASSAGES, tokenizer, 6, scoring)
        for text, row in zip(PASSAGES, ids):
            words = _words(tokenizer, row)
            assert 0 < len(row) <= 6
            assert not {"the", "was", "by", "in", "and"} & {w.lower() for w in words}
            assert [text.index(w) for w in words] == sorted(text.index(w) for w in words)


def test_an_unknown_scoring_is_refused_by_name(tokenizer):
    with pytest.raises(ValueError, match="keyword scoring must be one of tfidf_names, idf, got 'bm25'"):
        salient_token_ids(PASSAGES, tokenizer, 4, "bm25")
