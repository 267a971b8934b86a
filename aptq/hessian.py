"""Hessians of one decoder block, accumulated while the block runs on calibration batches (docs/algorithms.md §1–3).

Per block, from hooks on its linear layers and on its attention function:

- layer-wise `H = (2/N) Σ x xᵀ`, one per distinct input (q/k/v share one, o, gate/up share one, down);
- value Hessians `H_V,g = 2 E[X A_hᵀ A_h Xᵀ]` per KV head g, averaged over the query heads h of its group;
- row Hessians `G_Q,h = E[K_hᵀ K_h]` (per query head, from its KV head's keys) and `G_K,g = E[Q_hᵀ Q_h]` (per KV head,
  averaged over its query heads), with K/Q after RoPE mapped back to the weights' frame, through each family's q/k
  norm, query scaling and logit soft-cap (aptq/geometry.py; docs/families.md per family);
- APTQ traces `tr(2 E[JᵀJ])` of the attention output w.r.t. q/k/v/o and of the MLP output w.r.t. gate/up/down, by
  Hutchinson's estimator with Rademacher probes, with their standard errors. (our choice, as the issue asks, see
  docs/algorithms.md §3: the paper lets MLP layers use their own output; for down both agree, for gate/up we
  differentiate the MLP output, so they are measured after the down projection as q/k/v are after the out projection.)
- mixtures of experts (aptq.experts): each expert's H from the tokens routed to it, its traces from its own slice;
- models without the attention-aware path: only H, and traces of the block output (no cut between modules);
- with `mlp_rows`, for the MLP's up (and gate) projection `E[d dᵀ]` of the derivative of the down projection's input
  w.r.t. that projection's output, d = σ(g) for up and σ'(g) ⊙ u for gate (gated MLPs), σ'(u) for up (plain ones),
  with σ the MLP's own activation function: the MLP row factors' activation part (docs/algorithms.md §14);
- with `output_norms`, in blocks that normalise the out (down) projection's output before the residual add (Gemma
  2/3, OLMo 2), `H̃ = (2/N) Σ x xᵀ / σ(y)²` with σ(y) the norm's RMS of that token's output y: the column factor of
  the error after the norm; `H_V` and the attention-weighted `G_Q`/`G_K` then weigh each query position by the same
  1/σ² of the out projection's output there (docs/algorithms.md §16);
- the size of the residual stream each module writes into: the median over calibration tokens of ‖h‖² just after the
  attention output and just after the MLP output are added (the median, because a few "attention sink" tokens carry
  activations orders of magnitude above the rest). The allocator uses it to compare errors across blocks.

The attention probabilities, the post-RoPE queries and keys, the scaling, the soft-cap and the mask come from our own
eager attention function, registered in transformers' `AttentionInterface` and switched on for the block while it is
collected; it computes exactly what the eager path computes. On the first batch of each block the collector checks
that the recorded queries and keys are what the geometry assumes (projection → optional RMS norm → RoPE, times a
constant) and refuses the model with one sentence otherwise. `BlockHessians` hands the results on (to the sensitivity
analysis, and later to the quantizer), keyed by layer name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from aptq.capture import Batch, BlockStep
from aptq.errors import UserError
from aptq.experts import ExpertRecorder
from aptq.geometry import (
    OUTPUT_NORM_NAMES,
    AttentionGeometry,
    NormJacobian,
    RmsNorm,
    RotaryLayout,
    attention_weighted_rows,
    cap_slopes,
    complex_to_real,
    geometry_for,
    inverse_rms,
    key_pairs,
    mapped_middle,
    mapped_second_moment,
    output_norm_modules,
    qk_norm_modules,
    query_pairs,
    sandwiched_sum,
)
from aptq.models import Architecture, LinearLayer
from aptq.products import add_gram_, causal_products, symmetrized
from aptq.routed_attention import routed_through_interface

RECORDING_ATTENTION = "aptq_recording"
MLP_ACTIVATIONS = ("act_fn", "activation_fn", "act")  # where the families' MLPs (or OPT's blocks) keep σ
MODULE_INPUTS = ("q", "k", "v", "gate", "up")  # first linears of the attention and MLP modules
# (our choice) Gaussian sketches per segment and query head for the attention-weighted row Hessians: with L tokens per
# segment each adds L rank-one terms, so a few already give far more terms than G has entries. Up to SKETCHED_SEGMENTS
# segments each gets ROW_SKETCHES; beyond, those ROW_SKETCHES × SKETCHED_SEGMENTS sketches are spread over all segments,
# at least one each (the sketches' cost grows with the calibration set no faster than the rest of the pass).
ROW_SKETCHES = 4
SKETCHED_SEGMENTS = 8
SKETCH_STREAM = 1 << 20  # seeds the sketches apart from the probes
DEFAULT_PROBES = 1  # (our choice) Hutchinson probes per segment: keeps the traces near one extra forward+backward


# ---------------------------------------------------------------------------------------------------------------
# Attention recording


@dataclass(frozen=True)
class AttentionCall:
    """What one call of the attention function saw: post-RoPE queries (n, H, L, d) and keys (n, n_kv, L, d), the
    probabilities (n, H, L, L), the score scaling λ, the logit soft-cap c (None: none) and the additive mask."""

    query: torch.Tensor
    key: torch.Tensor
    probs: torch.Tensor
    scaling: float
    softcap: float | None
    mask: torch.Tensor


def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as transformers computes it, with Gemma 2's logit soft-cap) that also reports what it saw.

    A sliding window (`sliding_window` in kwargs) is already in the mask each layer receives, as on the eager path."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    repeats = query.shape[1] // key.shape[1]  # GQA: KV head g serves query heads g·r … g·r+r−1
    keys = key.repeat_interleave(repeats, dim=1)
    values = value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        attention_mask = _causal_mask(query.shape[2], keys.shape[2], scores.device, scores.dtype)
    elif attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
            ~attention_mask, torch.finfo(scores.dtype).min)
    scores = scores + attention_mask[..., : keys.shape[2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    recorder = getattr(module, "_aptq_recorder", None)
    if recorder is not None:
        recorder(AttentionCall(query, key, probs, scaling, softcap, attention_mask))
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), probs


def _causal_mask(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    visible = torch.ones(rows, cols, dtype=torch.bool, device=device).tril(cols - rows)
    return torch.zeros(rows, cols, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)


@contextmanager
def recording_attention(attention: nn.Module, recorder) -> Iterator[None]:
    """Route `attention` through `_recording_attention`, calling `recorder(AttentionCall)` on each call."""
    config = attention.config
    previous = config._attn_implementation
    config._attn_implementation = RECORDING_ATTENTION
    attention._aptq_recorder = recorder
    try:
        with routed_through_interface(attention):  # Falcon computes its attention inline otherwise
            yield
    finally:
        config._attn_implementation = previous
        del attention._aptq_recorder


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class BlockHessians:
    """Everything measured on one block, keyed by layer name (float32, CPU)."""

    block: int
    tokens: int  # N: calibration tokens seen
    layerwise: dict[str, torch.Tensor]  # H (d_in × d_in); layers with the same input share one tensor
    value: dict[str, torch.Tensor] = field(default_factory=dict)  # v layers: H_V (n_kv × d_in × d_in)
    row: dict[str, torch.Tensor] = field(default_factory=dict)  # q layers: G_Q (n_heads × d_h × d_h); k: G_K (n_kv …)
    mlp: dict[str, torch.Tensor] = field(default_factory=dict)  # gate/up layers: E[d dᵀ] (d_out × d_out), see above
    # o/down layers read by a post-norm, with `output_norms`: H̃ (d_in × d_in), see above
    output_normed: dict[str, torch.Tensor] = field(default_factory=dict)
    lm_trace: dict[str, float] = field(default_factory=dict)  # APTQ tr(H_LM) per layer
    lm_trace_se: dict[str, float] = field(default_factory=dict)  # its standard error
    # "attention" / "mlp": median over tokens of ‖h‖² of the residual stream just after that module's output is added
    residual: dict[str, float] = field(default_factory=dict)
    # Mixtures of experts: calibration tokens each expert layer's H came from, and the layers that fell back to the
    # pooled Hessian (aptq.experts); other layers saw all `tokens`.
    layer_tokens: dict[str, int] = field(default_factory=dict)
    pooled: list[str] = field(default_factory=list)

    def column(self, name: str) -> torch.Tensor:
        """The layer's column Hessian under the attention-aware objectives: H̃ where the post-norm weighting was
        collected for it, else the layer-wise H."""
        return self.output_normed.get(name, self.layerwise[name])


@dataclass(frozen=True)
class CollectOptions:
    attention: bool = True  # value and row Hessians
    mlp_rows: bool = False  # E[d dᵀ] of the MLP's gate and up projections
    probes: int = DEFAULT_PROBES  # Hutchinson probes per segment; 0 = no LM traces
    seed: int = 0
    # The row Hessians' pair weights: "uniform" (each query's visible keys alike, `AttentionGeometry`) or "attention"
    # (each query's probabilities, centred: aptq.geometry.attention_weighted_rows; our choice)
    row_weights: str = "uniform"
    output_norms: bool = False  # H̃ of the out and down projections read by a post-norm


def sketches_per_segment(segments: int) -> int:
    """Gaussian sketches drawn per calibration segment for the attention-weighted row Hessians (see ROW_SKETCHES)."""
    return max(1, ROW_SKETCHES * SKETCHED_SEGMENTS // max(segments, SKETCHED_SEGMENTS))


def _probe_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def rademacher(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """±1 signs drawn on `device` (no host-to-device copy per probe). The same seed gives the same signs on a device
    type; CUDA's generator is another stream than the CPU's, so its estimates differ within their standard error."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 2, shape, generator=generator, device=device).float().mul_(2).sub_(1)


class HessianCollector:
    """Hooks on one block that accumulate its Hessians; use as a context manager around the block's batches.

        with HessianCollector(step, arch, options) as collector:
            for batch in step.batches():
                step.keep_output(batch, collector.process(batch))
        hessians = collector.result()
    """

    def __init__(self, step: BlockStep, arch: Architecture, options: CollectOptions = CollectOptions(),
                 geometry_cache: dict | None = None) -> None:
        self.step = step
        self.arch = arch
        self.options = options
        block_layers = arch.block_layers(step.index)
        self.layers: list[LinearLayer] = [layer for layer in block_layers if layer.expert is None]
        expert_layers = [layer for layer in block_layers if layer.expert is not None]
        # Without the attention-aware path the traces differentiate the block output, with no cut (our choice).
        self.by_role = arch.attention_aware
        self.experts = ExpertRecorder(expert_layers, self._block_prefix(), self.by_role) if expert_layers else None
        self.by_kind = {layer.kind: layer for layer in self.layers}
        self.geometry_cache = {} if geometry_cache is None else geometry_cache
        self.tokens = 0
        self.segments = 0
        self.group_leaders = {}  # input group → first layer reading it
        for layer in self.layers:
            self.group_leaders.setdefault(layer.input_group, layer)
        # Running sums: per input group Σ x xᵀ; "value": Σ_h Σ (A_h Xᵀ)ᵀ(A_h Xᵀ) per KV head (n_kv × d_in × d_in)
        # (these two: upper triangles only, aptq.products);
        # "row_q"/"row_k": in half layout (`RotaryLayout`), either complex parts of the mapped second moments per KV
        # head (n_kv × 2 × d/2 × d/2, the table path) or real sums (n_heads resp. n_kv × d × d, the per-token path).
        self._sums: dict[str, torch.Tensor] = {}
        self._lm: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in block_layers}  # per-segment mean ‖g‖²
        self._inputs: dict[str, torch.Tensor] = {}  # per batch: module path → input
        self._outputs: dict[str, torch.Tensor] = {}  # per batch: module path → output
        self._attention: AttentionCall | None = None  # per batch
        self._norms: dict[str, RmsNorm | None] = {}  # "q"/"k": the family's q/k normalisation (set on entry)
        self._score_factors: tuple[float, float] | None = None  # d_h λ² α² for G_Q and G_K, from the first batch
        self._layout: RotaryLayout | None = None
        self._sketches: torch.Generator | None = None  # with row_weights "attention"
        self._residual: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}  # per-token ‖h‖²
        self._mlp_activation = None  # σ of the MLP, with `mlp_rows` on a model whose MLP has one up and one down
        self._post_norms: dict[str, nn.Module] = {}  # "o"/"down" → the block's post-norm reading it (set on entry)
        self._output_norms: dict[str, RmsNorm] = {}  # the same, linearised, with `output_norms`
        self._norm_inputs: dict[str, torch.Tensor] = {}  # per batch: kind → that norm's input
        self._post_norm_outputs: dict[str, torch.Tensor] = {}  # per batch: kind → that post-norm's output
        self._output_norms_checked = False
        self._stack = None

    # -- hooks -------------------------------------------------------------------------------------------------

    def _pre_hook(self, path: str, cut: bool):
        def hook(module: nn.Module, args: tuple):
            x = args[0]
            if cut and torch.is_grad_enabled():  # the traces differentiate each module on its own
                x = x.detach().requires_grad_()
            self._inputs[path] = x
            return (x, *args[1:])
        return hook

    def _forward_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._outputs[path] = output
        return hook

    def _record_attention(self, call: AttentionCall) -> None:
        self._attention = call

    def __enter__(self) -> HessianCollector:
        if self.options.attention:
            attention = self.step.block.get_submodule(self.arch.attention_attr)
            self._norms = {kind: RmsNorm.of(module) for kind, module in qk_norm_modules(attention).items()}
        if self.options.mlp_rows:
            self._mlp_activation = self._find_mlp_activation()
        # the residual stream and the traces read what the post-norms add to the stream
        self._post_norms = output_norm_modules(self.step.block)
        if self.options.output_norms:
            self._output_norms = {kind: RmsNorm.of(module) for kind, module in self._post_norms.items()
                                  if kind in self.by_kind}
        self._stack = self._hooked()
        return self

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The block without the collector's hooks for the duration: forward passes of another stream (the
        full-precision one, aptq.targets) leave nothing in its sums."""
        self._stack.close()
        try:
            yield
        finally:
            self._stack = self._hooked()

    def _hooked(self) -> ExitStack:
        """The collector's hooks (and the recording attention) on the block, undone by closing the stack."""
        stack = ExitStack()
        cut_paths = {layer.module_path for layer in self.layers if self.by_role and layer.kind in MODULE_INPUTS}
        for path in dict.fromkeys(layer.module_path for layer in self.layers):
            module = self.step.block.get_submodule(path[len(self._block_prefix()):])
            handles = (module.register_forward_pre_hook(self._pre_hook(path, path in cut_paths)),
                       module.register_forward_hook(self._forward_hook(path)))
            for handle in handles:
                stack.callback(handle.remove)
        if self.experts is not None:
            stack.enter_context(self.experts.hooked(self.step.block))
        if self.options.attention:
            attention = self.step.block.get_submodule(self.arch.attention_attr)
            stack.enter_context(recording_attention(attention, self._record_attention))
        for kind, module in self._post_norms.items():
            stack.callback(module.register_forward_hook(self._post_norm_hook(kind)).remove)
        for kind in self._output_norms:
            stack.callback(self._post_norms[kind].register_forward_pre_hook(self._norm_hook(kind)).remove)
        return stack

    def _post_norm_hook(self, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._post_norm_outputs[kind] = output
        return hook

    def _norm_hook(self, kind: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._norm_inputs[kind] = args[0]
        return hook

    def _find_mlp_activation(self):
        """The MLP's activation function, or None where the block's MLP is not one up (and one gate) projection
        read by one down projection (mixtures of experts: their layers keep the layer-wise objective)."""
        kinds = [layer.kind for layer in self.layers]
        if self.experts is not None or kinds.count("up") != 1 or kinds.count("down") != 1 or kinds.count("gate") > 1:
            return None
        holder = self.step.block if self.arch.mlp_attr is None else self.step.block.get_submodule(self.arch.mlp_attr)
        activation = next((getattr(holder, name) for name in MLP_ACTIVATIONS if callable(getattr(holder, name, None))),
                          None)
        if activation is None:
            raise UserError(f"The MLP of this {self.arch.family} model keeps its activation function under none of "
                            f"the names {', '.join(MLP_ACTIVATIONS)}; the MLP row factors (--mlp-rows) are unavailable "
                            f"for it.")
        return activation

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _block_prefix(self) -> str:
        return f"{self.arch.blocks_path}.{self.step.index}."

    # -- per batch -----------------------------------------------------------------------------------------------

    def process(self, batch: Batch) -> torch.Tensor:
        """Run the block on one batch, accumulate everything, and return the block's output (detached)."""
        with torch.set_grad_enabled(self.options.probes > 0):
            output = self.step.forward(batch)
        n, length = batch.hidden.shape[:2]
        with torch.no_grad():
            inputs = {path: x.detach().reshape(n, length, -1).float() for path, x in self._inputs.items()}
            self._accumulate_layerwise(inputs)
            if self._output_norms:  # first: it checks what the attention's weights are read from
                self._accumulate_output_normed(inputs)
            if self.options.attention:
                self._accumulate_attention(inputs, length)
            if self._mlp_activation is not None:
                self._accumulate_mlp(inputs)
            self._accumulate_residual(batch, output)
        if self.options.probes > 0:
            self._accumulate_traces(batch, inputs, n, length, output)
        self.tokens += n * length
        self.segments += n
        self._inputs, self._outputs, self._attention, self._norm_inputs = {}, {}, None, {}
        self._post_norm_outputs = {}
        return output.detach()

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def _gram_sum(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The running Σ xᵀx called `name` (zeros at first), added to in place; only its upper triangle is kept."""
        if name not in self._sums:
            self._sums[name] = like.new_zeros(shape)
        return self._sums[name]

    def _accumulate_layerwise(self, inputs: dict[str, torch.Tensor]) -> None:
        for group, layer in self.group_leaders.items():
            x = inputs[layer.module_path].reshape(-1, inputs[layer.module_path].shape[-1])
            if not torch.isfinite(x).all():
                raise UserError(f"The input of {layer.name} (block {self.step.index}) contains NaN or infinite "
                                f"values; the model is numerically unstable on this calibration data.")
            d_in = x.shape[-1]
            add_gram_(self._gram_sum(group, (d_in, d_in), x), x)

    def _accumulate_attention(self, inputs: dict[str, torch.Tensor], length: int) -> None:
        call = self._attention
        arch = self.arch
        if call is None:  # an attention computed inline (e.g. Falcon with ALiBi)
            raise UserError(f"The attention of this {arch.family} model does not go through transformers' attention "
                            f"functions, so its probabilities cannot be recorded; the attention-aware Hessians are "
                            f"unavailable for it.")
        repeats = arch.n_heads // arch.n_kv_heads
        x_v = inputs[self.by_kind["v"].module_path]  # (n, L, d_in)
        probs = call.probs.detach().float()
        d_in = x_v.shape[-1]
        value = self._gram_sum("value", (arch.n_kv_heads, d_in, d_in), x_v)
        # with the post-norm weighting, each query's output error counts as the norm after the out projection scales it
        weights = self._inverse_sizes("o")  # (n, L) or None
        for g in range(arch.n_kv_heads):  # one KV group at a time bounds the memory of A_h Xᵀ
            heads = slice(g * repeats, (g + 1) * repeats)
            start = 0
            for y in causal_products(probs[:, heads], x_v):  # strips of the rows of A_h Xᵀ, all heads of g
                if weights is not None:
                    y = y * weights[:, None, start:start + y.shape[-2], None]
                start += y.shape[-2]
                add_gram_(value[g], y.reshape(-1, d_in))
        rope = self.step.call_kwargs.get("position_embeddings") if arch.rope else None
        geometry = geometry_for(call.mask, rope, arch.head_dim, self.geometry_cache)
        self._layout = geometry.layout
        query, key = call.query.detach().float(), call.key.detach().float()
        if self._score_factors is None:
            self._score_factors = self._score_factors_checked(query, key, call.scaling, geometry.layout)
        factor_q, factor_k = self._score_factors
        if self.options.row_weights == "attention":
            row_q, row_k = self._rows_attention_weighted(query, key, probs, call, geometry, weights)
        elif call.softcap is None and self._norms.get("q") is None and self._norms.get("k") is None:
            row_q, row_k = self._rows_from_tables(geometry.layout.to_half(query), geometry.layout.to_half(key),
                                                  geometry, length)
        else:
            row_q, row_k = self._rows_per_token(query, key, call, geometry)
        self._add("row_q", row_q * factor_q)
        self._add("row_k", row_k * factor_k)

    def _rows_from_tables(self, query: torch.Tensor, key: torch.Tensor, geometry: AttentionGeometry,
                          length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Without q/k norm and soft-cap: per KV head, the complex parts of G_Q (its keys) and of G_K (the queries of
        its group) from the position tables."""
        repeats = self.arch.n_heads // self.arch.n_kv_heads
        row_q, row_k = [], []
        for g in range(self.arch.n_kv_heads):
            heads = slice(g * repeats, (g + 1) * repeats)
            row_q.append(mapped_second_moment(key[:, g], geometry.key_tables))
            row_k.append(mapped_second_moment(query[:, heads].reshape(-1, length, self.arch.head_dim),
                                              geometry.query_tables))
        return torch.stack(row_q), torch.stack(row_k)

    def _rows_per_token(self, query: torch.Tensor, key: torch.Tensor, call: AttentionCall,
                        geometry: AttentionGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """With a q/k norm (its Jacobian differs per token) or a soft-cap (its slope differs per pair): real G_Q per
        query head and G_K per KV head, one segment and head at a time (see `mapped_middle`)."""
        arch, layout = self.arch, geometry.layout
        repeats = arch.n_heads // arch.n_kv_heads
        jacobian_q, jacobian_k, query_half, key_half, row_q, row_k = self._per_token_start(query, key, layout)
        for s in range(query.shape[0]):
            for g in range(arch.n_kv_heads):
                # Without a cap the pair weights are the same for every head: the keys' sums serve the whole group.
                shared = None if call.softcap is not None else mapped_middle(key_half[s, g],
                                                                             query_pairs(geometry, None), layout)
                for h in range(g * repeats, (g + 1) * repeats):
                    slopes = (None if call.softcap is None
                              else cap_slopes(query[s, h], key[s, g], call.scaling, call.softcap))
                    keys = shared if shared is not None else mapped_middle(key_half[s, g],
                                                                           query_pairs(geometry, slopes), layout)
                    row_q[h] += sandwiched_sum(keys, jacobian_q(s, h))
                    queries = mapped_middle(query_half[s, h], key_pairs(geometry, slopes), layout)
                    row_k[g] += sandwiched_sum(queries, jacobian_k(s, g))
        return row_q, row_k

    def _rows_attention_weighted(self, query: torch.Tensor, key: torch.Tensor, probs: torch.Tensor,
                                 call: AttentionCall, geometry: AttentionGeometry,
                                 query_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Real G_Q per query head and G_K per KV head (half layout) with the attention-weighted, centred pair
        weights, one segment and query head at a time (aptq.geometry.attention_weighted_rows). `query_weights`
        (n, L): a factor on each query's score changes (the post-norm weighting), applied through the sketches: the
        query's row of the noise scaled by it scales its centred sketch and its key-side terms alike."""
        arch, layout = self.arch, geometry.layout
        repeats = arch.n_heads // arch.n_kv_heads
        jacobian_q, jacobian_k, query_half, key_half, row_q, row_k = self._per_token_start(query, key, layout)
        if self._sketches is None:  # one stream per block, so that a block's Hessians do not depend on the others
            self._sketches = torch.Generator(device=query.device).manual_seed(
                _probe_seed(self.options.seed, self.step.index, SKETCH_STREAM))
        length, sketches = query.shape[2], sketches_per_segment(self.step.n_segments)
        for s in range(query.shape[0]):
            # (our choice) one draw per segment serves every head and both sides: a fraction of the cost of drawing
            noise = torch.randn(sketches, length, length, generator=self._sketches, device=query.device)
            if query_weights is not None:
                noise = noise * query_weights[s, None, :, None]
            for h in range(arch.n_heads):
                g = h // repeats
                slopes = (None if call.softcap is None
                          else cap_slopes(query[s, h], key[s, g], call.scaling, call.softcap))
                terms = attention_weighted_rows(query_half[s, h], key_half[s, g], probs[s, h], slopes, layout,
                                                (jacobian_q(s, h), jacobian_k(s, g)), noise)
                row_q[h] += terms[0]
                row_k[g] += terms[1]
        return row_q, row_k

    def _per_token_start(self, query: torch.Tensor, key: torch.Tensor, layout: RotaryLayout) -> tuple:
        """What both per-token paths start from: the q/k norm Jacobians (segment, head) → J, the recorded vectors in
        half layout, and zeroed sums for G_Q per query head and G_K per KV head."""
        arch, d = self.arch, self.arch.head_dim
        return (self._norm_jacobians("q", arch.n_heads, layout), self._norm_jacobians("k", arch.n_kv_heads, layout),
                layout.to_half(query), layout.to_half(key), torch.zeros(arch.n_heads, d, d, device=query.device),
                torch.zeros(arch.n_kv_heads, d, d, device=query.device))

    def _norm_jacobians(self, kind: str, n_heads: int, layout: RotaryLayout):
        """(segment, head) → the `NormJacobian` of the q or k norm there (None without a norm)."""
        norm = self._norms.get(kind)
        if norm is None:
            return lambda s, h: None
        y = self._projection_output(kind)
        inverse, direction = norm.statistics(y, n_heads)
        gain = layout.to_half(norm.gain.to(y.device).reshape(-1, self.arch.head_dim).expand(n_heads, -1))
        direction = layout.to_half(direction)
        return lambda s, h: NormJacobian(inverse[s, h], direction[s, h], gain[h])

    def _projection_output(self, kind: str) -> torch.Tensor:
        """The q or k projection's output rows (n, L, heads · d_h), what the q/k norm (if any) reads."""
        layer = self.by_kind[kind]
        y = self._outputs[layer.module_path].detach()
        if layer.rows is not None:
            y = layer.rows.take(y, -1)
        return y.float()

    def _score_factors_checked(self, query: torch.Tensor, key: torch.Tensor, scaling: float,
                               layout: RotaryLayout) -> tuple[float, float]:
        """d_h λ² α² for G_Q and G_K, with α fitted so that the recorded vectors are α R_p N(y_p) (OPT's queries
        carry α = 1/√d_h; elsewhere α = 1). A family whose queries or keys are made otherwise is refused here, before
        any row Hessian is built from a wrong model of its attention."""
        factors = []
        for kind, recorded in (("q", query), ("k", key)):
            n, heads, length, d = recorded.shape
            y = self._projection_output(kind)
            norm = self._norms.get(kind)
            expected = (y if norm is None else norm(y)).reshape(n, length, heads, d).transpose(1, 2)
            expected = layout.rotate(expected)
            alpha = ((recorded * expected).sum() / expected.square().sum()).item()
            error = ((recorded - alpha * expected).norm() / recorded.norm()).item()
            tolerance = max(1e-3, 16 * torch.finfo(self._attention.query.dtype).eps)
            if not error <= tolerance:
                raise UserError(f"The {'queries' if kind == 'q' else 'keys'} of block {self.step.index} of this "
                                f"{self.arch.family} model are not made the way the row Hessians assume (projection, "
                                f"optional RMS norm, rotary embedding; relative mismatch {error:.2g}); the "
                                f"attention-aware q/k Hessians cannot be computed for it.")
            alpha = 1.0 if abs(alpha - 1.0) <= tolerance else alpha  # float noise of the fit is not a factor
            factors.append(self.arch.head_dim * scaling ** 2 * alpha ** 2)
        return factors[0], factors[1]

    def _accumulate_mlp(self, inputs: dict[str, torch.Tensor]) -> None:
        """Σ d dᵀ for the up (and gate) projection, d the derivative of the down projection's input w.r.t. that
        projection's output: σ(g) for up and σ'(g) ⊙ u for gate, σ'(u) for a plain MLP's up (σ' by forward-mode
        differentiation of the model's own σ). The down projection's recorded input is checked to be σ(g) ⊙ u (σ(u))
        first, so that no row factor is built from a wrong model of the MLP."""
        activation = self._mlp_activation
        up = self._projection_output("up").flatten(0, -2)  # tokens × d_out (OPT's MLP reads a flattened batch)
        gate = self._projection_output("gate").flatten(0, -2) if "gate" in self.by_kind else None
        pre_activation = up if gate is None else gate
        activated, slope = torch.func.jvp(activation, (pre_activation,), (torch.ones_like(pre_activation),))
        expected = activated if gate is None else activated * up
        derivatives = {"up": slope} if gate is None else {"up": activated, "gate": slope * up}
        down_input = inputs[self.by_kind["down"].module_path].flatten(0, -2)
        error = ((down_input - expected).norm() / down_input.norm()).item()
        tolerance = max(1e-3, 16 * torch.finfo(self._outputs[self.by_kind["up"].module_path].dtype).eps)
        if not error <= tolerance:
            raise UserError(f"The MLP of block {self.step.index} of this {self.arch.family} model does not feed its "
                            f"down projection {'σ(gate) ⊙ up' if gate is not None else 'σ(up)'} (relative mismatch "
                            f"{error:.2g}); the MLP row factors (--mlp-rows) cannot be computed for it.")
        for kind, derivative in derivatives.items():
            width = derivative.shape[-1]
            add_gram_(self._gram_sum(f"mlp_{kind}", (width, width), derivative), derivative)

    def _accumulate_output_normed(self, inputs: dict[str, torch.Tensor]) -> None:
        """Σ x xᵀ / σ(y)² for the out and down projections whose output y a post-norm reads. On the first batch the
        norm's recorded input is checked to be the projection's output, so that no token is weighed by another
        tensor's size."""
        for kind in self._output_norms:
            layer = self.by_kind[kind]
            output = self._outputs[layer.module_path]
            normed = self._norm_inputs[kind]
            if not self._output_norms_checked:
                error = ((normed.float() - output.float()).norm() / output.float().norm()).item()
                if not error <= max(1e-3, 16 * torch.finfo(output.dtype).eps):
                    raise UserError(f"The {OUTPUT_NORM_NAMES[kind]} of block {self.step.index} of this "
                                    f"{self.arch.family} model does not read the output of {layer.name} (relative "
                                    f"mismatch {error:.2g}); the post-norm weighting (--output-norms) is unavailable "
                                    f"for it.")
            x = inputs[layer.module_path].flatten(0, -2) * self._inverse_sizes(kind).reshape(-1, 1)
            add_gram_(self._gram_sum(f"normed_{kind}", (x.shape[-1], x.shape[-1]), x), x)
        self._output_norms_checked = True

    def _inverse_sizes(self, kind: str) -> torch.Tensor | None:
        """(n, L) 1/σ(y) per token of the output y the post-norm after `kind` reads; None without the weighting."""
        if kind not in self._output_norms:
            return None
        y = self._norm_inputs[kind].detach().float()
        return inverse_rms(y, self._output_norms[kind].eps).reshape(y.shape[0], -1)

    def _accumulate_residual(self, batch: Batch, output: torch.Tensor) -> None:
        """Per-token ‖h‖² of the residual stream after the attention add (block input + attention output, through
        the block's post-norm where it has one) and after the MLP add (the block output)."""
        if "o" in self.by_kind:
            attention_out = self._post_norm_outputs.get("o", self._outputs[self.by_kind["o"].module_path]).detach()
            attention_stream = batch.hidden + attention_out.reshape_as(batch.hidden)
        else:  # no known output projection: both read the block output (our choice)
            attention_stream = output.detach()
        for module, stream in (("attention", attention_stream), ("mlp", output.detach())):
            self._residual[module].append(stream.float().square().sum(-1).flatten().cpu())

    def _accumulate_traces(self, batch: Batch, inputs: dict[str, torch.Tensor], n: int, length: int,
                           block_output: torch.Tensor) -> None:
        """Hutchinson: per segment, ‖∂(uᵀF)/∂W‖² for Rademacher u on the attention and MLP outputs."""
        paths = list(dict.fromkeys(layer.module_path for layer in self.layers))
        module_outputs = [self._outputs[path] for path in paths]
        expert_outputs = self.experts.trace_tensors() if self.experts is not None else []
        # F: the attention output (after the out projection) and the MLP output (after the down projection, or the
        # experts' weighted sum), each after the block's post-norm where it has one (what the residual stream
        # receives); without the attention-aware path, the block output.
        if self.by_role:
            mlp_end = (self.experts.output if self.experts is not None
                       else self._outputs[self.by_kind["down"].module_path])
            ends = [self._post_norm_outputs.get("o", self._outputs[self.by_kind["o"].module_path]),
                    self._post_norm_outputs.get("down", mlp_end)]
        else:
            ends = [block_output]
        d_model = self.arch.hidden_size
        sums = {name: torch.zeros(n, device=batch.hidden.device) for name in self._lm}
        for probe in range(self.options.probes):
            objective = 0.0
            for end_index, output in enumerate(ends):
                signs = torch.stack([rademacher((length, d_model), _probe_seed(
                    self.options.seed, self.step.index, segment, probe, end_index), output.device)
                    for segment in batch.segments])
                objective = objective + (signs.to(dtype=output.dtype).reshape_as(output) * output).sum()
            grads = torch.autograd.grad(objective, module_outputs + expert_outputs,
                                        retain_graph=probe + 1 < self.options.probes)
            by_path = dict(zip(paths, grads))
            with torch.no_grad():
                for layer in self.layers:
                    delta = by_path[layer.module_path].reshape(n, length, -1).float()
                    if layer.rows is not None:
                        delta = layer.rows.take(delta, -1)
                    gradient = delta.transpose(1, 2) @ inputs[layer.module_path]  # (n, d_out, d_in) per segment
                    sums[layer.name] += gradient.square().sum((1, 2))
                if self.experts is not None:
                    self.experts.add_traces(list(grads[len(paths):]), sums, length)
        for name, total in sums.items():  # probes are seeded per segment: results do not depend on the batch size
            self._lm[name].append((total / self.options.probes).cpu())

    # -- results -------------------------------------------------------------------------------------------------

    def result(self) -> BlockHessians:
        if self.tokens == 0:
            raise ValueError("no batch was processed")
        scale = 2.0 / self.tokens
        shared = {group: (symmetrized(self._sums[group]) * scale).cpu() for group in self.group_leaders}
        hessians = BlockHessians(self.step.index, self.tokens,
                                 {layer.name: shared[layer.input_group] for layer in self.layers})
        if self.experts is not None:
            expert_hessians, hessians.layer_tokens, hessians.pooled = self.experts.hessians(self.step.index)
            hessians.layerwise.update(expert_hessians)
        hessians.residual = {module: torch.cat(norms).median().item() for module, norms in self._residual.items()}
        for kind in self._output_norms:
            hessians.output_normed[self.by_kind[kind].name] = (symmetrized(self._sums[f"normed_{kind}"]) * scale).cpu()
        for kind in ("gate", "up"):
            if f"mlp_{kind}" in self._sums:
                hessians.mlp[self.by_kind[kind].name] = (symmetrized(self._sums[f"mlp_{kind}"]) / self.tokens).cpu()
        if self.options.attention:
            repeats = self.arch.n_heads // self.arch.n_kv_heads
            hessians.value[self.by_kind["v"].name] = (symmetrized(self._sums["value"]) * (scale / repeats)).cpu()
            row_q, row_k = self._sums["row_q"], self._sums["row_k"]
            if row_q.is_complex():  # the table path: one G_Q per KV head, shared by its query heads
                row_q = complex_to_real(row_q).repeat_interleave(repeats, dim=0)
                row_k = complex_to_real(row_k)
            from_half = self._layout.from_half_matrix
            hessians.row[self.by_kind["q"].name] = from_half(row_q / self.segments).cpu()
            hessians.row[self.by_kind["k"].name] = from_half(row_k / (self.segments * repeats)).cpu()
        if self.options.probes > 0:
            length = self.tokens // self.segments
            for name, chunks in self._lm.items():
                # (our choice) the standard error over per-segment estimates: it covers probe noise and the spread
                # of the calibration segments, the two random parts of the estimate.
                per_segment = torch.cat(chunks).double() * (2.0 / length)
                hessians.lm_trace[name] = per_segment.mean().item()
                hessians.lm_trace_se[name] = (per_segment.std().item() / math.sqrt(per_segment.numel())
                                              if per_segment.numel() > 1 else float("nan"))
        return hessians
