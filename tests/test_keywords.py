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


# only the middle sentence holds a word that is not a stop word
STORY = "It was what it was. Halvorsen sailed the Zorbic to Osterby in 1712. And so it is, as it was before."


def test_sentences_keep_the_most_salient_whole_sentences_in_text_order(tokenizer):
    from pqa_core.modeling.keywords import salient_sentence_ids, sentences

    parts = sentences(STORY)
    assert parts == ["It was what it was.", "Halvorsen sailed the Zorbic to Osterby in 1712.",
                     "And so it is, as it was before."]
    texts = [STORY, *PASSAGES]
    ids = [tokenizer(p if i == 0 else " " + p, add_special_tokens=False)["input_ids"] for i, p in enumerate(parts)]
    # room for the salient sentence alone: it is kept whole, not the first one
    names = salient_sentence_ids(texts, tokenizer, len(ids[1]))[0]
    assert names == ids[1]
    # room for two: the salient one and then, of the two equally bare, the earlier; in text order
    assert salient_sentence_ids(texts, tokenizer, len(ids[0]) + len(ids[1]))[0] == ids[0] + ids[1]
    # a budget ending inside a sentence keeps its beginning, and never more than the budget
    assert salient_sentence_ids(texts, tokenizer, len(ids[1]) + 3)[0] == ids[0][:3] + ids[1]
    # closing quotes and brackets stay with their sentence; nothing but whitespace is lost
    said = 'He said: "Go!" Then (at dawn.) Évian left… 1712 came? ‘Next’ one. U.S. Army met e.g. them.'
    assert sentences(said) == ['He said: "Go!"', "Then (at dawn.)", "Évian left…", "1712 came?", "‘Next’ one.",
                               "U.S.", "Army met e.g. them."]
    assert sentences("") == sentences("  \n ") == [] and sentences("no stop here") == ["no stop here"]
    assert salient_sentence_ids(["", "no stop here"], tokenizer, 0) == [[], []]
    longest = tokenizer("no stop here", add_special_tokens=False)["input_ids"]
    assert salient_sentence_ids(["no stop here", *PASSAGES], tokenizer, 2)[0] == longest[:2]  # its beginning
    whole = salient_sentence_ids(texts, tokenizer, 10_000)[0]
    assert " ".join(tokenizer.decode(whole).split()) == " ".join(STORY.split())  # all of it, in order
    with pytest.raises(ValueError, match="keyword scoring must be one of"):
        salient_sentence_ids(texts, tokenizer, 4, "bm25")


def test_the_sentences_writer_writes_the_embeddings_of_its_sentences(tokenizer):
    import torch

    from pqa_core.components import plugins
    from pqa_core.modeling.keywords import salient_sentence_ids
    from pqa_core.modeling.llm import load_llm

    llm, tok = load_llm("tiny")
    plugins.load_plugins()
    texts = [STORY, *PASSAGES]
    writer = plugins.build("writer", "sentences", {}, {"llm": llm, "tokenizer": tok, "num_tokens": 12,
                                                       "keyword_scoring": "tfidf_names", "d_model": None})
    written = writer.write_documents(texts, [[]] * len(texts))
    weight = llm.get_input_embeddings().weight.detach().float()
    for row, ids in zip(written, salient_sentence_ids(texts, tok, 12)):
        assert torch.equal(row[:len(ids)], weight[ids]) and not row[len(ids):].any()
    keywords = plugins.build("writer", "keywords", {}, {"llm": llm, "tokenizer": tok, "num_tokens": 12,
                                                        "keyword_scoring": "tfidf_names", "d_model": None})
    assert not torch.equal(keywords.write_documents(texts, [[]] * len(texts)), written)  # another selection


def test_the_sentences_writer_keeps_the_writer_contract():
    from pqa_core.testing import check_plugin

    check_plugin("writer", "sentences")


@pytest.mark.parametrize("name", ["keywords", "sentences"])
def test_a_passage_is_written_with_the_corpus_idf_whichever_block_holds_it(name):
    """Prepared with the corpus, a writer writes a passage alone as it writes it among all the others
    (a table larger than one block of rows is written block by block)."""
    import torch

    from pqa_core.components import plugins
    from pqa_core.modeling.llm import load_llm

    llm, tok = load_llm("tiny")
    plugins.load_plugins()
    texts = [STORY, *PASSAGES]
    writer = plugins.build("writer", name, {}, {"llm": llm, "tokenizer": tok, "num_tokens": 6,
                                                "keyword_scoring": "idf", "d_model": None})
    unprepared = writer.write_documents(texts[1:2], [[]])
    writer.prepare(texts, [[]] * len(texts))
    together, alone = writer.write_documents(texts, [[]] * len(texts)), writer.write_documents(texts[1:2], [[]])
    assert torch.equal(together[1], alone[0])
    if name == "keywords":  # alone, its own idf chooses other words (the passage is one sentence: the same)
        assert not torch.equal(unprepared[0], alone[0])
