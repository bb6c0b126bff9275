"""Answer metrics against SQuAD v1.1 semantics (values computed by hand) and recall@k."""
import random

import pytest
import torch

from pqa_core.evaluation.metrics import (compute_em, compute_f1, compute_recall_at_k, compute_substring, normalize_answer,
                              recall_at_k)

# a SQuAD v1.1 dev question ("Where did Super Bowl 50 take place?") and its three gold answers
SUPER_BOWL_ANSWERS = ["Santa Clara, California", "Levi's Stadium",
                      "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."]


@pytest.mark.parametrize("text, expected", [
    ("the Denver Broncos", "denver broncos"),
    ("  An apple,  a   DAY! ", "apple day"),
    ("Levi's Stadium.", "levis stadium"),
    ("theatre and another thing", "theatre and another thing"),  # articles only as whole words
    ("24–10", "24–10"),  # the en dash is not in string.punctuation, as in the official script
    ("The", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_articles_case_and_punctuation():
    assert compute_em("the Denver Broncos", "Denver Broncos") == 1.0
    assert compute_em("Denver Broncos.", ["Carolina Panthers", "denver broncos"]) == 1.0
    assert compute_em("Denver", "Denver Broncos") == 0.0
    assert isinstance(compute_em("x", "x"), float)


def test_f1_partial_overlaps():
    assert compute_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert compute_f1("Carolina Panthers", "Denver Broncos") == 0.0
    assert compute_f1("cat cat", "the cat") == pytest.approx(2 / 3)  # bag overlap counts "cat" once: P 1/2, R 1
    assert compute_f1("a black cat sat", "the cat sat down") == pytest.approx(2 / 3)  # P 2/3, R 2/3
    assert compute_f1("cat cat", "cat cat dog") == pytest.approx(0.8)  # repeated tokens count: P 1, R 2/3


def test_f1_takes_the_best_gold_answer():
    # normalised prediction: levis stadium in santa clara (5 tokens)
    # vs "santa clara california": 2 common, P 2/5, R 2/3 -> 0.5
    # vs "levis stadium": 2 common, P 2/5, R 1 -> 4/7
    # vs the long answer (11 tokens): 5 common, P 1, R 5/11 -> 0.625
    prediction = "Levi's Stadium in Santa Clara"
    assert compute_f1(prediction, SUPER_BOWL_ANSWERS[0]) == pytest.approx(0.5)
    assert compute_f1(prediction, SUPER_BOWL_ANSWERS[1]) == pytest.approx(4 / 7)
    assert compute_f1(prediction, SUPER_BOWL_ANSWERS) == pytest.approx(0.625)
    assert compute_em(prediction, SUPER_BOWL_ANSWERS) == 0.0


def test_answers_normalising_to_nothing_follow_the_official_script():
    assert compute_em("The", "a") == 1.0
    assert compute_f1("The", "a") == 0.0


def test_substring_match():
    assert compute_substring("I think it was the Denver Broncos, in 2016.", "Denver Broncos") == 1.0
    assert compute_substring("Broncos", "Denver Broncos") == 0.0
    assert compute_substring("at Levi's Stadium", SUPER_BOWL_ANSWERS) == 1.0
    assert compute_substring("the cat", "The") == 0.0  # an empty normalised answer is not in everything
    assert compute_substring("an", "The") == 1.0


@pytest.mark.parametrize("metric", [compute_em, compute_f1, compute_substring])
def test_metrics_need_a_gold_answer(metric):
    with pytest.raises(ValueError):
        metric("x", [])


def test_recall_at_k_for_one_item():
    assert compute_recall_at_k([5, 3, 9], [3, 7], k=2) == 0.5
    assert compute_recall_at_k([5, 3, 9], [3, 7], k=1) == 0.0
    assert compute_recall_at_k([7, 3], [3, 7], k=5) == 1.0
    with pytest.raises(ValueError):
        compute_recall_at_k([1], [], k=1)


def test_tensor_recall_matches_per_item_recall():
    rng = random.Random(0)
    num_docs, batch, k = 20, 64, 5
    selected = torch.stack([torch.randperm(num_docs)[:k] for _ in range(batch)])
    gold_rows = [rng.sample(range(num_docs), rng.randint(1, 3)) for _ in range(batch)]
    gold = torch.tensor([g + [-1] * (3 - len(g)) for g in gold_rows])
    for top in (1, 3, 5):
        expected = [compute_recall_at_k(s, g, top) for s, g in zip(selected.tolist(), gold_rows)]
        got = recall_at_k(selected, gold, k=top)
        assert got.dtype == torch.float32 and got.shape == (batch,)
        assert got.tolist() == pytest.approx(expected)
    assert 0 < recall_at_k(selected, gold).mean() < 1


def test_tensor_recall_hand_example_and_errors():
    selected = torch.tensor([[4, 0], [1, 2]])
    gold = torch.tensor([[0, -1], [3, 2]])
    assert recall_at_k(selected, gold).tolist() == [1.0, 0.5]
    assert recall_at_k(selected, gold, k=1).tolist() == [0.0, 0.0]
    # a selection padded with -1 (fewer documents than k) must not match the gold padding
    assert recall_at_k(torch.tensor([[0, -1]]), torch.tensor([[0, -1]])).tolist() == [1.0]
    with pytest.raises(ValueError, match="row 1"):
        recall_at_k(selected, torch.tensor([[0], [-1]]))
