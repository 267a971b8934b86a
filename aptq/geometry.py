"""The attention geometry behind the row Hessians G_Q / G_K: how each family turns projection outputs into scores.

For query head h of one segment the score of query p on key j is (docs/families.md writes out every family)

    s_pj = φ(λ ⟨q_p, k_j⟩),   q_p = α R_p N(y_p),   k_j likewise from the key projection,

with y_p the head's slice of the projection output, N the optional RMS normalisation of q/k (per head or over the whole
projection), R_p the rotary embedding at position p (full or partial, pairs (i, i + r/2) or (2i, 2i + 1)), α a constant
factor applied before the attention function (OPT scales its queries there), λ the scaling the attention function
receives and φ the logit soft-cap c·tanh(·/c) (the identity without one). The row Hessian of the query projection is
the Gauss–Newton matrix, with respect to y, of the pair-weighted first-order score change, summed over positions and
averaged over segments:

    G_Q,h = d_h · E_seg Σ_p Σ_j ω_pj (∂s_pj/∂y_p)(∂s_pj/∂y_p)ᵀ
          = d_h λ² α² · E_seg Σ_p J_pᵀ R_pᵀ (Σ_j ω_pj φ'_pj² k_j k_jᵀ) R_p J_p,

with J_p the Jacobian of N at y_p (the identity without a norm) and ω the pair weights of `AttentionGeometry`. G_K
mirrors it (keys mapped with their own R_j and J_j, queries summed). The norm and the cap are linearised at the
calibration point (our choice, as the papers do for the softmax: a norm or cap makes the score nonlinear in the
weights, and the first-order term is what a quadratic objective can hold). The factor d_h keeps the unit the project
always used: for standard attention (λ = 1/√d_h, α = 1, no norm, no cap) G_Q = E Σ ω R_pᵀ k kᵀ R_p = E[Kᵀ K] of
docs/algorithms.md §2.

Two paths compute it. Without a norm and a cap the middle factor does not depend on the data per position, so the sums
over positions collapse into per-position tables shared by all blocks (`AttentionGeometry`, O(L d²) per segment).
Otherwise (`mapped_middle`, `sandwiched_sum`) the per-position matrices are formed one segment and head at a time:
windowed sums of the outer products by cumulative sums (causal and sliding-window masks), or a dense L × L product when
the soft-cap gives every pair its own weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from aptq.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Rotary embeddings


@dataclass(frozen=True)
class RotaryLayout:
    """The rotary embedding of a segment as complex multipliers on coordinate pairs.

    `order` permutes a head vector into the "half layout", where pair partners sit at (i, i + d/2): pair i is read as
    ξ_i = x_i + i·x_{i+d/2} and rotated at position p by `multipliers[p, i]` = cos + i·sin. Coordinates a family does
    not rotate (partial rotary) are paired among themselves with multiplier 1.
    """

    order: torch.Tensor  # (d,) long
    multipliers: torch.Tensor  # (L, d/2) complex64

    def to_half(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors[..., self.order]

    def from_half_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """A (…, d, d) matrix in half-layout coordinates back in the weights' coordinates."""
        inverse = torch.argsort(self.order)
        return matrix[..., inverse, :][..., :, inverse]

    def rotate(self, vectors: torch.Tensor) -> torch.Tensor:
        """R_p x for vectors (…, L, d) in the weights' coordinates."""
        half = self.to_half(vectors).float()
        width = half.shape[-1] // 2
        turned = torch.complex(half[..., :width], half[..., width:]) * self.multipliers
        return torch.cat([turned.real, turned.imag], -1)[..., torch.argsort(self.order)]


def rotary_layout(position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, length: int, head_dim: int,
                  device: torch.device) -> RotaryLayout:
    """The layout of the (cos, sin) a model passes to its blocks: the width of cos is the rotary width r (partial
    rotary rotates the first r coordinates of a head); rotate-half pairs (i, i + r/2) carry the same frequency in both
    halves of cos, interleaved pairs (2i, 2i + 1) in neighbouring entries."""
    if head_dim % 2:
        raise UserError(f"Row Hessians need an even head size; this model's is {head_dim}.")
    if position_embeddings is None:
        return RotaryLayout(torch.arange(head_dim, device=device),
                            torch.ones(length, head_dim // 2, dtype=torch.complex64, device=device))
    cos, sin = (t.reshape(-1, t.shape[-2], t.shape[-1])[0, :length].float().to(device) for t in position_embeddings)
    rotary = cos.shape[-1]
    if rotary % 2 or rotary > head_dim or (head_dim - rotary) % 2:
        raise UserError(f"The rotary embedding of width {rotary} does not fit heads of size {head_dim} in pairs; "
                        f"the row Hessians cannot map it back.")
    half = rotary // 2
    if torch.allclose(cos[:, :half], cos[:, half:]) and torch.allclose(sin[:, :half], sin[:, half:]):
        first = torch.arange(half, device=device)  # rotate-half (Llama and most families)
        second = first + half
    elif torch.allclose(cos[:, 0::2], cos[:, 1::2]) and torch.allclose(sin[:, 0::2], sin[:, 1::2]):
        first = torch.arange(0, rotary, 2, device=device)  # interleaved (Cohere)
        second = first + 1
    else:
        raise UserError("This model's rotary embedding pairs its coordinates in a way the row Hessians do not know "
                        "(neither rotate-half nor interleaved).")
    rest = (head_dim - rotary) // 2
    unrotated = torch.arange(rest, device=device) + rotary
    order = torch.cat([first, unrotated, second, unrotated + rest])
    multipliers = torch.ones(length, head_dim // 2, dtype=torch.complex64, device=device)
    multipliers[:, :half] = torch.complex(cos[:, first], sin[:, first])
    return RotaryLayout(order, multipliers)


# ---------------------------------------------------------------------------------------------------------------
# q/k normalisation


QK_NORM_NAMES = {"q": ("q_norm", "q_layernorm"), "k": ("k_norm", "k_layernorm")}  # attributes families use


def qk_norm_modules(attention: nn.Module) -> dict[str, nn.Module | None]:
    """The modules that normalise queries and keys between the projections and RoPE (None where there is none)."""
    return {kind: next((getattr(attention, name) for name in names if getattr(attention, name, None) is not None),
                       None) for kind, names in QK_NORM_NAMES.items()}


# Blocks that normalise each module's output before adding it to the residual stream (Gemma 2/3, OLMo 2) hold a
# post-feedforward norm; their `post_attention_layernorm` then reads the attention output. (In Llama-like blocks
# `post_attention_layernorm` is the MLP's input norm and there is no post-feedforward norm.) The collector checks that
# each norm reads its layer's output before it weighs anything by it.
OUTPUT_NORM_NAMES = {"o": "post_attention_layernorm", "down": "post_feedforward_layernorm"}


def output_norm_modules(block: nn.Module) -> dict[str, nn.Module]:
    """kind ("o", "down") → the RMS norm that reads that projection's output, for blocks with post-norms; {} else."""
    if getattr(block, OUTPUT_NORM_NAMES["down"], None) is None:
        return {}
    return {kind: getattr(block, name) for kind, name in OUTPUT_NORM_NAMES.items()}


def inverse_rms(y: torch.Tensor, eps: float) -> torch.Tensor:
    """`1/σ(y) = 1/sqrt(mean(y²) + eps)` over the last axis: per token, the factor an RMS norm divides y by."""
    return (y.square().mean(-1) + eps).rsqrt()


@dataclass(frozen=True)
class RmsNorm:
    """y ↦ gain ⊙ y / sqrt(mean(y²) + eps) over `gain.numel()` coordinates (one head, or the whole projection).

    Read off the family's module: `gain` is its output on a vector of ones times sqrt(1 + eps), whatever the family
    stores (Gemma keeps 1 + weight). The collector checks on the first batch that it reproduces the recorded queries.
    """

    gain: torch.Tensor  # (span,) float32
    eps: float

    @staticmethod
    def of(module: nn.Module | None) -> RmsNorm | None:
        if module is None:
            return None
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if eps is None or weight is None or weight.dim() != 1:
            raise UserError(f"The normalisation {type(module).__name__} is not an RMS norm over one axis; the "
                            f"attention-aware Hessians cannot linearise it.")
        with torch.no_grad():
            ones = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
            gain = module(ones).float() * (1.0 + float(eps)) ** 0.5
        return RmsNorm(gain, float(eps))

    def statistics(self, y: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For y (n, L, H·d): 1/σ per token and span (n, H, L) and the unit direction u = y / (σ √span) (n, H, L, d).

        The Jacobian at y is J = (1/σ) diag(gain) (I − u uᵀ). Over the whole projection (OLMo 2) σ and u are shared by
        the heads and J couples them; each head keeps its own diagonal block (our choice, see `NormJacobian`).
        """
        n, length, width = y.shape
        span = self.gain.numel()
        if width % span or (span != width and span * n_heads != width):
            raise UserError(f"A q/k normalisation over {span} coordinates does not match {n_heads} heads of width "
                            f"{width // n_heads}.")
        grouped = y.float().reshape(n, length, width // span, span)
        sigma = (grouped.square().mean(-1, keepdim=True) + self.eps).sqrt()
        direction = (grouped / (sigma * span ** 0.5)).reshape(n, length, n_heads, -1).transpose(1, 2)
        inverse = (1.0 / sigma).expand(-1, -1, -1, span).reshape(n, length, n_heads, -1)[..., 0].transpose(1, 2)
        return inverse, direction

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """N(y) for y (…, span·k): normalised per span."""
        grouped = y.float().reshape(*y.shape[:-1], -1, self.gain.numel())
        normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps) * self.gain
        return normed.reshape(y.shape)


@dataclass(frozen=True)
class NormJacobian:
    """J_p = scale_p · diag(gain) (I − u_p u_pᵀ) for one segment and head, in half-layout coordinates.

    For a norm over the whole projection this is the head's diagonal block of the full Jacobian: the blocks that couple
    heads are dropped (our choice: G stays one d_h × d_h matrix per head, as BoA's row compensation needs; the dropped
    part is −(1/σ) diag(gain_h) u_h u_gᵀ, of the order of 1/n_heads of the kept one).
    """

    scale: torch.Tensor  # (L,)
    direction: torch.Tensor  # (L, d)
    gain: torch.Tensor  # (d,)


# ---------------------------------------------------------------------------------------------------------------
# Masks and pair weights


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (queries × keys) visibility from an additive float mask of shape (…, L, L)."""
    plane = mask.reshape(-1, *mask.shape[-2:])[0]
    return plane > torch.finfo(plane.dtype).min / 2


def _contiguous_ranges(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, [start, stop) of its visible entries when they are contiguous (causal and sliding-window masks)."""
    count = visible.sum(1)
    start = visible.int().argmax(1)
    columns = torch.arange(visible.shape[1], device=visible.device)
    band = (columns[None] >= start[:, None]) & (columns[None] < (start + count)[:, None])
    return (start, start + count) if torch.equal(band, visible) else None


class AttentionGeometry:
    """Pair weights and rotation tables for the row Hessians, fixed by the mask and the rotary embedding of a segment.

    Pair weights (our choice of normalization, the papers give only `E‖K ΔW_Q X‖²`): each query's score change is
    averaged over the keys it sees, then over queries: `ω_pj = 1 / (L · #keys seen by p)` for visible pairs, Σ ω = 1.

    Tables (the path without norm and cap): a rotation multiplies pair i by c_p,i, so `R_pᵀ x xᵀ R_p` has Hermitian
    part `conj(c_a) c_b ξ_a conj(ξ_b)` and pseudo part `conj(c_a c_b) ξ_a ξ_b`; with ω fixed, the sums over p collapse
    into per-position tables (`L × d/2 × d/2`) multiplied elementwise with `ξ ξᴴ` and `ξ ξᵀ`.
    """

    def __init__(self, visible: torch.Tensor, layout: RotaryLayout) -> None:
        length = visible.shape[0]
        self.layout = layout
        self.query_weight = 1.0 / (visible.sum(1).float() * length)  # ω_pj = query_weight[p] on visible pairs
        self.omega = visible.float() * self.query_weight[:, None]
        self.query_ranges = _contiguous_ranges(visible)  # keys seen by each query
        self.key_ranges = _contiguous_ranges(visible.T)  # queries that see each key
        rotation = layout.multipliers
        conj = rotation.conj()
        hermitian = (conj[:, :, None] * rotation[:, None, :]).reshape(length, -1)
        pseudo = (conj[:, :, None] * conj[:, None, :]).reshape(length, -1)
        shape = (length, rotation.shape[1], rotation.shape[1])
        omega = self.omega.to(torch.complex64)
        # Tables per key position (G_Q: sum over the queries that see it) and per query position (G_K).
        self.key_tables = ((omega.T @ hermitian).reshape(shape), (omega.T @ pseudo).reshape(shape))
        self.query_tables = ((omega @ hermitian).reshape(shape), (omega @ pseudo).reshape(shape))


def _fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()


def geometry_for(mask: torch.Tensor, position_embeddings, head_dim: int,
                 cache: dict[tuple, AttentionGeometry]) -> AttentionGeometry:
    """The geometry of a batch, shared by all blocks with the same mask and rotary embedding (cached in `cache`).

    The key holds both: sliding-window layers (Mistral, Gemma 2/3) see other masks than full ones, and Gemma 3's local
    layers rotate with another base than its global ones.
    """
    visible = _visible(mask)
    length = visible.shape[0]
    rope_key = None if position_embeddings is None else tuple(
        _fingerprint(t.reshape(-1, t.shape[-2], t.shape[-1])[0, :length]) for t in position_embeddings)
    key = (length, head_dim, _fingerprint(visible), rope_key)
    if key not in cache:
        cache[key] = AttentionGeometry(visible, rotary_layout(position_embeddings, length, head_dim, visible.device))
    return cache[key]


# ---------------------------------------------------------------------------------------------------------------
# Sums


def _complex_pairs(vectors: torch.Tensor) -> torch.Tensor:
    """(…, d) real in half layout → (…, d/2) complex ξ_i = x_i + i·x_{i+d/2} (at least single precision)."""
    half = vectors.shape[-1] // 2
    vectors = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    return torch.complex(vectors[..., :half], vectors[..., half:])


def mapped_second_moment(vectors: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Σ over the batch and positions of the rotation-mapped, pair-weighted outer products, in complex form.

    `vectors`: (m, L, d) real in half layout (m = segments × heads pooled into one Hessian); returns the Hermitian and
    pseudo parts stacked as (2, d/2, d/2) complex; `complex_to_real` turns a sum of these into the d × d matrix.
    """
    xi = _complex_pairs(vectors).transpose(0, 1)  # (L, m, d/2)
    hermitian = (xi.transpose(1, 2) @ xi.conj()) * tables[0]  # per position: Σ_m ξ_a conj(ξ_b), weighted
    pseudo = (xi.transpose(1, 2) @ xi) * tables[1]
    return torch.stack([hermitian.sum(0), pseudo.sum(0)])


def complex_to_real(parts: torch.Tensor) -> torch.Tensor:
    """(…, 2, d/2, d/2) Hermitian/pseudo parts → (…, d, d) real second moment."""
    hermitian, pseudo = parts[..., 0, :, :], parts[..., 1, :, :]
    top = torch.cat([(hermitian.real + pseudo.real) / 2, (pseudo.imag - hermitian.imag) / 2], dim=-1)
    bottom = torch.cat([(hermitian.imag + pseudo.imag) / 2, (hermitian.real - pseudo.real) / 2], dim=-1)
    return torch.cat([top, bottom], dim=-2)


@dataclass(frozen=True)
class PairWeights:
    """Weights w_rc of the pairs (mapped position r, summed position c) for one segment and head.

    Either `dense` (L × L: soft-capped scores give each pair its own weight; masks that are not bands) or
    `row_factor[r] · column_factor[c]` on the contiguous column ranges [start, stop) of each row, summed by
    cumulative sums.
    """

    dense: torch.Tensor | None = None
    row_factor: torch.Tensor | None = None
    column_factor: torch.Tensor | None = None
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ_c w_rc values_c for every row r; values (L, a, b)."""
        if self.dense is not None:
            return torch.einsum("rc,cab->rab", self.dense.to(values.dtype), values)
        scaled = values * self.column_factor.to(values.dtype)[:, None, None]
        start, stop = self.ranges
        if not start.any() and bool((stop > 0).all()):  # prefixes (causal queries): nothing cancels
            windows = scaled.cumsum(0)[stop - 1]
        elif bool((stop == len(scaled)).all()):  # suffixes (causal keys)
            windows = scaled.flip(0).cumsum(0).flip(0)[start]
        else:  # sliding windows: a difference of two float64 running sums
            running = torch.cat([torch.zeros_like(scaled[:1]), scaled]).to(torch.complex128).cumsum(0)
            windows = (running[stop] - running[start]).to(values.dtype)
        return windows * self.row_factor[:, None, None]


def query_pairs(geometry: AttentionGeometry, cap_slope: torch.Tensor | None) -> PairWeights:
    """Pair weights for G_Q (rows: queries p, columns: keys j): ω_pj, times φ'_pj² with a soft-cap."""
    if cap_slope is not None or geometry.query_ranges is None:
        return PairWeights(dense=geometry.omega if cap_slope is None else geometry.omega * cap_slope.square())
    ones = torch.ones_like(geometry.query_weight)
    return PairWeights(row_factor=geometry.query_weight, column_factor=ones, ranges=geometry.query_ranges)


def key_pairs(geometry: AttentionGeometry, cap_slope: torch.Tensor | None) -> PairWeights:
    """Pair weights for G_K (rows: keys j, columns: queries p): the transpose of `query_pairs`."""
    if cap_slope is not None or geometry.key_ranges is None:
        return PairWeights(dense=(geometry.omega if cap_slope is None else geometry.omega * cap_slope.square()).T)
    ones = torch.ones_like(geometry.query_weight)
    return PairWeights(row_factor=ones, column_factor=geometry.query_weight, ranges=geometry.key_ranges)


def mapped_middle(vectors: torch.Tensor, weights: PairWeights, layout: RotaryLayout) -> torch.Tensor:
    """R_rᵀ (Σ_c w_rc v_c v_cᵀ) R_r for every mapped position r of one segment and head, as complex parts
    (L, 2, d/2, d/2) in half layout (`complex_to_real` gives the real matrices).

    `vectors`: (L, d) in half layout (the keys for G_Q, the queries for G_K).
    """
    xi = _complex_pairs(vectors)  # (L, d/2)
    turn = layout.multipliers.conj()
    hermitian = weights.sums(xi[:, :, None] * xi.conj()[:, None, :]) * (turn[:, :, None] * turn.conj()[:, None, :])
    pseudo = weights.sums(xi[:, :, None] * xi[:, None, :]) * (turn[:, :, None] * turn[:, None, :])
    return torch.stack([hermitian, pseudo], 1)


def sandwiched_sum(middle: torch.Tensor, jacobian: NormJacobian | None) -> torch.Tensor:
    """Σ_r J_rᵀ M_r J_r (d × d, half layout) from `mapped_middle`'s M_r; Σ_r M_r without a norm.

    With J_r = s_r D (I − u_r u_rᵀ), D = diag(gain), and N_r = s_r² D M_r D (symmetric), the sum is
    Σ N − (A + Aᵀ) + Σ (uᵀNu) u uᵀ with A = Σ (N u) uᵀ. Σ N is one weighted sum of the complex parts; N_r u_r comes
    from them too (M v ↔ (H w + P w̄)/2 for v = [a; b], w = a + i b), so no per-position real matrix is formed."""
    if jacobian is None:
        return complex_to_real(middle.sum(0))
    gain, u = jacobian.gain, jacobian.direction
    weights = jacobian.scale.square()
    total = complex_to_real(torch.einsum("r,r...->...", weights.to(middle.dtype), middle)) * (gain[:, None] * gain)
    v = gain * u  # D u_r
    w = _complex_pairs(v)[..., None]  # (L, d/2, 1)
    mapped = (middle[:, 0] @ w + middle[:, 1] @ w.conj())[..., 0] / 2  # M_r D u_r in complex form
    pushed = torch.cat([mapped.real, mapped.imag], -1) * gain * weights[:, None]  # N_r u_r
    cross = pushed.T @ u
    curvature = (pushed * u).sum(-1)
    return total - cross - cross.T + (u * curvature[:, None]).T @ u


def cap_slopes(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float) -> torch.Tensor:
    """φ'_pj = 1 − tanh²(λ ⟨q_p, k_j⟩ / c) for one segment and head (L × L): the soft-cap's slope at each score."""
    return 1.0 - torch.tanh((query @ key.T) * (scaling / softcap)).square()


# ---------------------------------------------------------------------------------------------------------------
# Attention-weighted row Hessians (our choice, `CollectOptions.row_weights = "attention"`)


def _mapped_back(vectors: torch.Tensor, layout: RotaryLayout, jacobian: NormJacobian | None) -> torch.Tensor:
    """J_rᵀ R_rᵀ v_r for vectors (…, L, d) in half layout, position r along the second-last axis."""
    turned = _complex_pairs(vectors) * layout.multipliers.conj()
    mapped = torch.cat([turned.real, turned.imag], -1)
    if jacobian is None:
        return mapped
    mapped = mapped * jacobian.gain
    mapped = mapped - (mapped * jacobian.direction).sum(-1, keepdim=True) * jacobian.direction
    return mapped * jacobian.scale[:, None]


def attention_weighted_rows(query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor, slopes: torch.Tensor | None,
                            layout: RotaryLayout, jacobians: tuple[NormJacobian | None, NormJacobian | None],
                            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment and query head: the unscaled G_Q and G_K terms (d × d, half layout) of the softmax-aware objective.

    The pair-weighted objective of `AttentionGeometry` counts a score change on every visible key alike, and counts a
    change shared by all keys of a query, which the softmax does not see. Here each query's score changes are weighed
    by its probabilities and centred: `Var_{A_p}(Δs_p) = Δsᵀ (diag(A_p) − A_p A_pᵀ) Δs`, the second-order change of the
    query's attention distribution (the KL divergence's Gauss–Newton term, ×2). For the query projection that is
    exact per position:

        G_Q ∝ (1/L) Σ_p J_pᵀ R_pᵀ K̃ᵀ (diag(A_p) − A_p A_pᵀ) K̃ R_p J_p      (K̃: the recorded keys, rows j);

    for the key projection the centring couples the keys of a query, and only each key's own block is kept:

        G_K ∝ (1/L) Σ_j J_jᵀ R_jᵀ (Σ_p A_pj (1 − A_pj) q̃_p q̃_pᵀ) R_j J_j.

    With a soft-cap every pair's score change also carries φ'_pj. The L × L × d² sums are estimated with Gaussian
    sketches (unbiased, positive semi-definite): with ξ ~ N(0, I), `(diag(√A_p) − A_p √A_pᵀ) ξ` has the covariance
    `diag(A_p) − A_p A_pᵀ`. `query`, `key`: (L, d) in half layout; `probs`, `slopes`: (L, L); `noise`: standard normal
    (samples, L, L), which may be shared by heads and by both sides (each estimate stays unbiased).
    """
    samples, length, _ = noise.shape
    d = query.shape[-1]
    root = probs.sqrt() * noise
    centred = root - probs * root.sum(-1, keepdim=True)
    key_weights = probs - probs.square()
    if slopes is not None:
        centred = centred * slopes
        key_weights = key_weights * slopes.square()
    query_side = _mapped_back(centred @ key, layout, jacobians[0]).reshape(-1, d)
    key_side = _mapped_back((key_weights.sqrt() * noise).transpose(1, 2) @ query, layout, jacobians[1]).reshape(-1, d)
    scale = 1.0 / (samples * length)
    return query_side.T @ query_side * scale, key_side.T @ key_side * scale
