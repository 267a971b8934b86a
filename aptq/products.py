"""Matrix products of the Hessian accumulation that skip work whose result is known (aptq.hessian).

- `add_gram_`: `total += xᵀx` computed on and above the diagonal blocks only (a Gram matrix is symmetric);
  `symmetrized` fills in the lower triangle once, when the sum is read.
- `causal_products`: `A_h Xᵀ` for attention probabilities A_h, skipping the blocks above the diagonal where a causal
  mask makes the probabilities exactly 0 (checked, not assumed: a block that is not all zeros is multiplied).

Both cut the matrices into `blocks` strips: block row i needs the columns from strip i on (Gram) or up to the end of
strip i (causal), so `(blocks + 1) / (2 · blocks)` of the flops remain. The results equal the full products up to
the order of float summation.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

# (our choice) 4 strips keep 62.5 % of the flops; the strips stay wide enough (≥ 128 rows or columns for the embedded
# model) that a GEMM on them runs as fast per flop as the full one. bench/results/analysis_speed.md.
PRODUCT_BLOCKS = 4


def _strips(size: int, blocks: int) -> list[tuple[int, int]]:
    step = -(-size // blocks)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def add_gram_(total: Tensor, x: Tensor, blocks: int = PRODUCT_BLOCKS) -> None:
    """`total += xᵀx` (x: rows × d, total: d × d) on and above the diagonal blocks; below them total is not written."""
    for start, end in _strips(x.shape[-1], blocks):
        total[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])


def symmetrized(upper: Tensor) -> Tensor:
    """The symmetric matrices (… × d × d) whose upper triangles are those of `upper`."""
    triangle = upper.triu()
    return triangle + triangle.triu(1).transpose(-2, -1)


def causal_products(probs: Tensor, x: Tensor, blocks: int = PRODUCT_BLOCKS) -> Iterator[Tensor]:
    """`probs @ x` per head, in strips of query rows: probs (n × heads × L_q × L_k), x (n × L_k × d); yields
    (n × heads × rows × d) for consecutive strips of rows.

    A query row t sees keys up to t + L_k − L_q under a causal mask; the keys after a strip's last visible one are
    skipped when their probabilities are all exactly 0 (softmax of a −inf or dtype-min score), else multiplied."""
    queries, keys = probs.shape[-2:]
    offset = keys - queries
    for start, end in _strips(queries, blocks):
        strip = probs[..., start:end, :]
        visible = max(0, min(keys, end + offset))
        if strip[..., visible:].any():
            visible = keys
        yield strip[..., :visible] @ x[:, None, :visible]
