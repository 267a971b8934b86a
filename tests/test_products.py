"""The structured products of the Hessian accumulation against the plain ones (aptq.products)."""

import torch

from aptq.products import add_gram_, causal_products, symmetrized


def test_gram_sum_equals_full_gram_over_several_batches():
    torch.manual_seed(0)
    batches = [torch.randn(37, 23) for _ in range(3)]
    total = torch.zeros(23, 23)
    for x in batches:
        add_gram_(total, x)
    full = sum(x.T @ x for x in batches)
    assert torch.allclose(symmetrized(total), full, rtol=1e-5, atol=1e-4)
    assert torch.equal(symmetrized(total), symmetrized(total).T)


def test_gram_of_a_stacked_slice_is_written_in_place():
    x = torch.randn(10, 6)
    stacked = torch.zeros(2, 6, 6)
    add_gram_(stacked[1], x, blocks=3)
    assert torch.allclose(symmetrized(stacked)[1], x.T @ x, atol=1e-5)
    assert not stacked[0].any()


def _causal_probs(n: int, heads: int, queries: int, keys: int) -> torch.Tensor:
    scores = torch.randn(n, heads, queries, keys)
    hidden = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
    return torch.softmax(scores.masked_fill(hidden, torch.finfo(scores.dtype).min), dim=-1)


def test_causal_products_equal_the_full_product():
    torch.manual_seed(1)
    x = torch.randn(2, 13, 5)
    for queries in (13, 9):  # square, and queries after a prefix of keys
        probs = _causal_probs(2, 3, queries, 13)
        strips = list(causal_products(probs, x))
        assert len(strips) > 1
        assert torch.allclose(torch.cat(strips, dim=-2), probs @ x[:, None], atol=1e-6)


def test_probabilities_above_the_diagonal_are_multiplied_when_not_zero():
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(1, 2, 8, 8), dim=-1)  # no mask: every key visible
    x = torch.randn(1, 8, 4)
    assert torch.allclose(torch.cat(list(causal_products(probs, x)), dim=-2), probs @ x[:, None], atol=1e-6)
