"""Query-likelihood reranking: the score is the mean log-probability of the question's tokens.

Hand-computed cases for the scoring function, and the batched, left-padded forward pass checked
against an independent per-row computation on a small random Llama (the slicing that maps
logits to continuation tokens is where an off-by-one would hide).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.rag.query_likelihood import continuation_logprobs, mean_logprob
from components.rag.rerank import order_by_scores


def test_uniform_logits_give_minus_log_vocabulary():
    assert mean_logprob(torch.zeros(1, 4), torch.tensor([2])) == pytest.approx(-math.log(4))


def test_mean_of_two_hand_computed_tokens():
    # row 0: softmax([ln 3, 0]) = [3/4, 1/4], target 0 -> log 3/4; row 1: uniform -> log 1/2
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    expected = (math.log(0.75) + math.log(0.5)) / 2
    assert mean_logprob(logits, torch.tensor([0, 1])) == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _alone(model, context: list[int], cont: list[int]) -> float:
    """Independent: one unpadded row, full logits, continuation token t read at position t - 1."""
    ids = torch.tensor([context + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(context)
    return sum(float(logp[start + j - 1, tok]) for j, tok in enumerate(cont)) / len(cont)


def test_a_padded_batch_scores_each_row_as_it_scores_alone(tiny_llama):
    rows = [
        ([1, 5, 7, 9, 11, 13, 2], [21, 22, 23]),
        ([1, 4], [21, 22, 23]),
        ([1, 6, 8, 10], [30, 31, 32, 33, 34]),  # a longer continuation: more logits kept
    ]
    batched = continuation_logprobs(tiny_llama, rows, pad_id=0)
    alone = [_alone(tiny_llama, list(c), list(q)) for c, q in rows]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 4) for x in batched)) == 3  # the rows really differ


def test_order_by_scores_is_best_first_and_stable_on_ties():
    items = ["a", "b", "c", "d"]
    assert order_by_scores(items, [0.1, 0.5, 0.5, -1.0], None) == [
        ("b", 0.5), ("c", 0.5), ("a", 0.1), ("d", -1.0)
    ]  # fmt: skip
    assert order_by_scores(items, [0.1, 0.5, 0.5, -1.0], 2) == [("b", 0.5), ("c", 0.5)]


def test_a_missing_model_is_one_line_naming_the_key(tmp_path):
    from components.errors import MissingInputError
    from components.rag.query_likelihood import load_query_likelihood
    from components.rag.service import load_generator

    with pytest.raises(MissingInputError, match=r"^rag_index\.ql_model: .* is neither a bundled model"):
        load_query_likelihood(str(tmp_path / "nowhere"))
    with pytest.raises(
        MissingInputError, match=r"^rag_index\.generator: .* is neither 'champion', a bundled"
    ):
        load_generator(str(tmp_path / "nowhere"))
