"""Reranker data preparation and scoring logic, without training: BM25, pairs, splits, metrics."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from components.errors import PosttrainError
from components.rag.rerank import (
    BM25,
    Passage,
    Reranker,
    TrainPair,
    build_pairs,
    evaluate_pairs,
    split_pairs,
    tokenize,
)

# 3 documents; after stopwords ("the", "on", "and", "with"):
#   d0 = cat sat mat (3 tokens), d1 = dog sat (2), d2 = cats dogs play cat (4); average length 3
DOCS = ["The cat sat on the mat", "the dog sat", "Cats and dogs play with the cat"]

CORPUS = [
    (
        "Volcanic ash clouds",
        "Volcanic ash rises high into the sky during an eruption. Fine ash damages jet "
        "engines when aircraft fly through the cloud. Airports close for days after large eruptions nearby.",
    ),
    (
        "Volcano monitoring",
        "Scientists watch volcanoes with seismometers and gas sensors every day. "
        "A swarm of small earthquakes often comes before an eruption. "
        "Satellites measure how the ground swells upward.",
    ),
    (
        "Baking rye bread",
        "Rye bread needs a sour starter because rye flour has little gluten. The dough "
        "feels sticky and heavy compared with wheat dough. Bake the loaf slowly until the crumb is set.",
    ),
    (
        "Wheat bread basics",
        "Wheat dough becomes elastic when the gluten is kneaded for ten minutes. Yeast "
        "makes the dough rise in a warm kitchen. A hot oven gives the bread a crisp brown crust.",
    ),
    (
        "Training for a marathon",
        "Runners build their weekly distance slowly over many months. The long "
        "run on the weekend teaches the body to burn fat. Rest days matter as much as the hard sessions.",
    ),
    (
        "Cycling in the mountains",
        "Climbing long mountain passes on a bicycle needs low gears. Riders eat "
        "small snacks every half hour to keep their energy up. The descent is fast and the brakes get hot.",
    ),
    (
        "Keeping chickens",
        "Backyard chickens need a dry coop and a fenced run outside. Hens lay most eggs "
        "in spring and summer when days are long. Foxes hunt at dusk so the coop door must close.",
    ),
    (
        "Bees and honey",
        "A honeybee colony stores nectar as honey in wax combs. The queen lays up to two "
        "thousand eggs each day in summer. Beekeepers leave enough honey for the colony to survive winter.",
    ),
    (
        "Tides",
        "Ocean tides rise and fall twice a day along most coasts of the world. The moon pulls "
        "the water toward it and creates a bulge. Spring tides happen when sun and moon line up.",
    ),
    (
        "Solo",
        "This passage has a one-word title so only its sentences become queries for training. "
        "Each sentence here has more than six words in it. Short text elsewhere yields nothing at all.",
    ),
    ("Too short", "Only four words here."),
]


@pytest.fixture
def passages() -> list[Passage]:
    return [
        Passage(chunk_id=f"c{i}", source="doc.md", text=text, title=title)
        for i, (title, text) in enumerate(CORPUS)
    ]


def by_query(pairs: list[TrainPair]) -> dict[tuple[str, str], list[TrainPair]]:
    out: dict[tuple[str, str], list[TrainPair]] = defaultdict(list)
    for pair in pairs:
        out[(pair.group, pair.query)].append(pair)
    return out


def test_tokenize_drops_stopwords_and_case():
    assert tokenize("The Cat, and the HAT!") == ["cat", "hat"]


def test_bm25_matches_hand_computation():
    bm25 = BM25(DOCS)
    assert bm25.avg_length == 3.0
    # "cat": df = 2 of N = 3, idf = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)) = ln(1.6).
    # d0: tf 1, length 3 = average -> tf * (k1 + 1) / (tf + k1) = 2.5 / 2.5 = 1, so the score is ln(1.6).
    # d2: tf 1, length 4 -> 2.5 / (1 + 1.5 * (0.25 + 0.75 * 4 / 3)) = 2.5 / 2.875.
    idf = math.log(1.6)
    np.testing.assert_allclose(bm25.scores("cat"), [idf, 0.0, idf * 2.5 / 2.875])

    # the general formula for a two-term query ("sat": df 2 as well); repeated terms count once
    def term(tf: int, length: int, df: int) -> float:
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.5 / (tf + 1.5 * (1 - 0.75 + 0.75 * length / 3))

    expected = [term(1, 3, 2) + term(1, 3, 2), term(1, 2, 2), term(1, 4, 2)]
    np.testing.assert_allclose(bm25.scores("Cat sat, cat!"), expected)
    np.testing.assert_allclose(bm25.scores("the on with"), [0.0, 0.0, 0.0])  # stopwords only
    np.testing.assert_allclose(bm25.scores("unicorn"), [0.0, 0.0, 0.0])


def test_bm25_top_orders_skips_zero_and_excluded():
    bm25 = BM25(DOCS)
    assert bm25.top("cat sat", k=5) == [0, 1, 2]  # 2 ln1.6 > ln1.6 * 2.5/2.125 > ln1.6 * 2.5/2.875
    assert bm25.top("cat", k=5) == [0, 2]  # d1 scores 0: not a match
    assert bm25.top("cat", k=5, exclude={0}) == [2]
    assert bm25.top("cat sat", k=1) == [0]
    assert bm25.top("cat", k=0) == []
    assert BM25([]).top("cat", k=3) == []


def test_build_pairs_one_positive_and_negatives_per_query(passages):
    pairs = build_pairs(passages, seed=0, queries_per_passage=3, negatives=3)
    groups = by_query(pairs)
    assert len(groups) > 20
    originals = {p.chunk_id: p for p in passages}
    for (group, query), members in groups.items():
        assert [m.label for m in members].count(1.0) == 1
        assert [m.label for m in members].count(0.0) == 3
        positive = next(m for m in members if m.label == 1.0)
        source = originals[group]
        for negative in (m for m in members if m.label == 0.0):
            assert negative.passage != source.text and negative.passage != positive.passage
            if query != source.title:
                assert query not in negative.passage


def test_build_pairs_cloze_query_removed_from_positive(passages):
    pairs = build_pairs(passages, seed=0, queries_per_passage=3)
    titles = {p.title for p in passages}
    originals = {p.chunk_id: p for p in passages}
    cloze = [p for p in pairs if p.label == 1.0 and p.query not in titles]
    assert len(cloze) >= 10
    for pair in cloze:
        assert pair.query in originals[pair.group].text  # a sentence of the passage ...
        assert pair.query not in pair.passage  # ... cut out of the positive
        assert len(pair.query.split()) >= 6


def test_build_pairs_titles_and_short_passages(passages):
    pairs = build_pairs(passages, seed=0, queries_per_passage=2)
    queries = {p.query for p in pairs}
    assert {"Volcanic ash clouds", "Baking rye bread", "Training for a marathon"} <= queries
    assert "Solo" not in queries and "Tides" not in queries  # one-word titles are not queries
    assert "Solo" in {passages[int(p.group[1:])].title for p in pairs if p.label == 1.0}  # its sentences are
    assert "c10" not in {p.group for p in pairs}  # four words: too little text for any query
    # a title query's positive is the passage as is
    title_pair = next(p for p in pairs if p.query == "Bees and honey" and p.label == 1.0)
    assert title_pair.passage == passages[7].text
    # at most queries_per_passage per passage, title first
    for group in {p.group for p in pairs}:
        assert len({p.query for p in pairs if p.group == group}) <= 2


def test_build_pairs_title_equal_to_text_is_not_a_query():
    passages = [
        Passage("a", "x", "Seven words in this passage title here", "Seven words in this passage title here"),
        Passage("b", "x", "A different passage about harbours, ships and cranes at work."),
        Passage("c", "x", "Yet another passage about mountain goats climbing steep cliffs."),
    ]
    pairs = build_pairs(passages, seed=0, queries_per_passage=2, negatives=1)
    assert "a" not in {p.group for p in pairs}


def test_build_pairs_hard_negatives_first_then_random(passages):
    pairs = build_pairs(passages, seed=0, queries_per_passage=2, negatives=1)
    first = next(p for p in pairs if p.query == "Wheat bread basics" and p.label == 0.0)
    assert first.passage == passages[2].text  # the rye passage: the only other one with "wheat" and "bread"
    # no shared words anywhere: negatives still come (randomly), distinct and never the positive
    odd = [
        Passage("x1", "s", "Alpha bravo charlie delta echo foxtrot golf hotel."),
        Passage("x2", "s", "India juliet kilo lima mike november oscar papa."),
        Passage("x3", "s", "Quebec romeo sierra tango uniform victor whiskey xray."),
        Passage("x4", "s", "Yankee zulu one two three four five six seven."),
    ]
    pairs = build_pairs(odd, seed=3, queries_per_passage=1, negatives=3, min_words=6)
    for (group, _), members in by_query(pairs).items():
        negatives = [m.passage for m in members if m.label == 0.0]
        assert len(negatives) == 3 and len(set(negatives)) == 3
        assert next(p.text for p in odd if p.chunk_id == group) not in negatives


def test_build_pairs_deterministic_per_seed(passages):
    a = build_pairs(passages, seed=0, queries_per_passage=3)
    assert a == build_pairs(passages, seed=0, queries_per_passage=3)
    assert a != build_pairs(passages, seed=1, queries_per_passage=3)


def test_build_pairs_skips_identical_texts_as_negatives(passages):
    copy = Passage("dup", "other.md", passages[0].text, "Ash from volcanoes")
    pairs = build_pairs([*passages, copy], seed=0, negatives=3)
    for pair in pairs:
        if pair.group in {"c0", "dup"} and pair.label == 0.0:
            assert pair.passage != passages[0].text


def test_split_pairs_keeps_groups_apart(passages):
    pairs = build_pairs(passages, seed=0, queries_per_passage=3)
    train, held_out = split_pairs(pairs, eval_share=0.3, seed=0)
    assert {p.group for p in train}.isdisjoint({p.group for p in held_out})
    assert sorted(map(repr, train + held_out)) == sorted(map(repr, pairs))
    n_groups = len({p.group for p in pairs})
    assert len({p.group for p in held_out}) == round(n_groups * 0.3)
    assert split_pairs(pairs, 0.3, seed=0) == (train, held_out)
    assert split_pairs(pairs, 0.3, seed=1) != (train, held_out)
    assert split_pairs(pairs, 0.0, seed=0) == (list(pairs), [])
    two_groups = [p for p in pairs if p.group in {"c0", "c1"}]
    tiny_train, tiny_eval = split_pairs(two_groups, 0.01, seed=0)  # rounds to 0 groups, but one each side
    assert tiny_train and tiny_eval
    with pytest.raises(PosttrainError):
        split_pairs(pairs, 1.0, seed=0)


class _OverlapModel:
    """Stands in for a CrossEncoder: the score is the number of shared words (ties possible)."""

    def predict(self, pairs, **kwargs):  # CrossEncoder.predict's call shape
        return np.array([len(set(q.split()) & set(p.split())) for q, p in pairs], dtype=np.float32)


def test_evaluate_pairs_mrr_and_ties():
    pairs = [
        # query 1: positive shares 2 words, negatives 1 and 0 -> rank 1
        TrainPair("red apple", "red apple pie", 1.0, "g1"),
        TrainPair("red apple", "red car", 0.0, "g1"),
        TrainPair("red apple", "blue sky", 0.0, "g1"),
        # query 2: two negatives beat the positive -> rank 3
        TrainPair("fast train", "slow boat", 1.0, "g2"),
        TrainPair("fast train", "fast train station", 0.0, "g2"),
        TrainPair("fast train", "fast car", 0.0, "g2"),
        # query 3: a tie with a negative counts against the positive -> rank 2
        TrainPair("green tea", "green leaves", 1.0, "g3"),
        TrainPair("green tea", "tea cups", 0.0, "g3"),
    ]
    result = evaluate_pairs(_OverlapModel(), pairs)
    assert result["queries"] == 3
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert result["accuracy@1"] == pytest.approx(1 / 3)
    assert evaluate_pairs(_OverlapModel(), [])["queries"] == 0


def test_reranker_rerank_orders_and_keeps_ties_stable():
    reranker = Reranker.__new__(Reranker)  # no model load: the scoring model is stubbed
    reranker.model = _OverlapModel()
    reranker.batch_size = 32
    items = [{"t": "blue sky"}, {"t": "red car"}, {"t": "red apple pie"}, {"t": "red hat"}]
    ranked = reranker.rerank("red apple", items, text_of=lambda item: item["t"], top_k=3)
    assert [item["t"] for item, _ in ranked] == ["red apple pie", "red car", "red hat"]  # car before hat
    assert [score for _, score in ranked] == [2.0, 1.0, 1.0]
    assert len(reranker.rerank("red apple", items, text_of=lambda item: item["t"], top_k=None)) == 4
    assert reranker.rerank("red apple", [], text_of=str, top_k=3) == []
    assert reranker.scores("red", ["red", "blue"]).dtype == np.float32


def test_reranker_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(PosttrainError, match="no reranker model"):
        Reranker(tmp_path)
    with pytest.raises(PosttrainError, match="no reranker model"):
        Reranker(tmp_path / "missing")
