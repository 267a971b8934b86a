"""Hessians of one decoder block, accumulated while the block runs on calibration batches (ALGORITHMS.md §1–3).

Per block, from hooks on its linear layers and on its attention function:

- layer-wise `H = (2/N) Σ x xᵀ`, one per distinct input (q/k/v share one, o, gate/up share one, down);
- value Hessians `H_V,g = 2 E[X A_hᵀ A_h Xᵀ]` per KV head g, averaged over the query heads h of its group;
- row Hessians `G_Q,h = E[K_hᵀ K_h]` (per query head, from its KV head's keys) and `G_K,g = E[Q_hᵀ Q_h]` (per KV head,
  averaged over its query heads), with K/Q after RoPE mapped back to the weights' frame (see `AttentionGeometry`);
- APTQ traces `tr(2 E[JᵀJ])` of the attention output w.r.t. q/k/v/o and of the MLP output w.r.t. gate/up/down, by
  Hutchinson's estimator with Rademacher probes, with their standard errors. (our choice, as the issue asks:
  ALGORITHMS.md §3 lets MLP layers use their own output; for down both agree, for gate/up we differentiate the MLP
  output, so they are measured after the down projection as q/k/v are after the out projection.)
- the size of the residual stream each module writes into: the median over calibration tokens of ‖h‖² just after the
  attention output and just after the MLP output are added (the median, because a few "attention sink" tokens carry
  activations orders of magnitude above the rest). The allocator uses it to compare errors across blocks.

The attention probabilities, the post-RoPE queries and keys and the mask come from our own eager attention function,
registered in transformers' `AttentionInterface` and switched on for the block while it is collected; it computes
exactly what the eager path computes. `BlockHessians` hands the results on (to the sensitivity analysis, and later to
the quantizer), keyed by layer name.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface

from aptq.capture import Batch, BlockStep
from aptq.errors import UserError
from aptq.models import Architecture, LinearLayer

RECORDING_ATTENTION = "aptq_recording"
# Layers reading the same tensor share one layer-wise Hessian.
INPUT_GROUPS = {"q": "attention", "k": "attention", "v": "attention", "o": "o", "gate": "mlp", "up": "mlp",
                "down": "down"}
MODULE_INPUTS = ("q", "k", "v", "gate", "up")  # first linears of the attention and MLP modules
DEFAULT_PROBES = 1  # (our choice) Hutchinson probes per segment: keeps the traces near one extra forward+backward


# ---------------------------------------------------------------------------------------------------------------
# Attention recording


def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as transformers computes it) that also reports queries, keys, probabilities and the mask."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    repeats = query.shape[1] // key.shape[1]  # GQA: KV head g serves query heads g·r … g·r+r−1
    keys = key.repeat_interleave(repeats, dim=1)
    values = value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
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
        recorder(query, key, probs, scaling, attention_mask)
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), probs


def _causal_mask(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    visible = torch.ones(rows, cols, dtype=torch.bool, device=device).tril(cols - rows)
    return torch.zeros(rows, cols, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)


@contextmanager
def recording_attention(attention: nn.Module, recorder) -> Iterator[None]:
    """Route `attention` through `_recording_attention`, calling `recorder(query, key, probs, scaling, mask)`."""
    config = attention.config
    previous = config._attn_implementation
    config._attn_implementation = RECORDING_ATTENTION
    attention._aptq_recorder = recorder
    try:
        yield
    finally:
        config._attn_implementation = previous
        del attention._aptq_recorder


# ---------------------------------------------------------------------------------------------------------------
# Which keys each query sees, and RoPE


class AttentionGeometry:
    """Pair weights and rotation tables for the row Hessians, fixed by the mask and the positions of a segment.

    The surrogate objective (ALGORITHMS.md §2, scaled like H) is (our choice of normalization, the papers give only
    `E‖K ΔW_Q X‖²`): the score change `Δs_pj` of each query p averaged over the keys j it sees, averaged over
    queries, times 2. With pair weights `ω_pj = 1 / (L · #keys seen by p)` for visible pairs, so that Σ ω = 1:

        G_Q = Σ_p Σ_j ω_pj · R_pᵀ k_j k_jᵀ R_p      (k_j after RoPE, mapped back with the query's rotation R_p)
        G_K = Σ_p Σ_j ω_pj · R_jᵀ q_p q_pᵀ R_j

    so that `Σ_p x_pᵀ ΔWᵀ M_p ΔW x_p`, with the position-dependent middle factor replaced by its mean `G`, is
    `(N/2) tr(G ΔW H ΔWᵀ)`. A rotation multiplies each pair (i, i + d/2) of coordinates, read as the complex number
    ξ_i = x_i + i·x_{i+d/2}, by c_p,i = cos + i·sin; so `R_pᵀ x xᵀ R_p` has Hermitian part `conj(c_a) c_b ξ_a conj(ξ_b)`
    and pseudo part `conj(c_a c_b) ξ_a ξ_b`, and the sums over p collapse into per-position tables (`L × d/2 × d/2`)
    multiplied elementwise with `ξ ξᴴ` and `ξ ξᵀ`. Without RoPE, c = 1.
    """

    def __init__(self, visible: torch.Tensor, rotation: torch.Tensor | None, head_dim: int) -> None:
        if head_dim % 2:
            raise UserError(f"Row Hessians need an even head size; this model's is {head_dim}.")
        length = visible.shape[0]
        omega = visible.to(torch.complex64) / visible.sum(1, keepdim=True) / length
        if rotation is None:
            rotation = torch.ones(length, head_dim // 2, dtype=torch.complex64, device=visible.device)
        conj = rotation.conj()
        hermitian = (conj[:, :, None] * rotation[:, None, :]).reshape(length, -1)
        pseudo = (conj[:, :, None] * conj[:, None, :]).reshape(length, -1)
        shape = (length, head_dim // 2, head_dim // 2)
        # Tables per key position (G_Q: sum over the queries that see it) and per query position (G_K).
        self.key_tables = ((omega.T @ hermitian).reshape(shape), (omega.T @ pseudo).reshape(shape))
        self.query_tables = ((omega @ hermitian).reshape(shape), (omega @ pseudo).reshape(shape))


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (queries × keys) visibility from an additive float mask of shape (…, L, L)."""
    plane = mask.reshape(-1, *mask.shape[-2:])[0]
    return plane > torch.finfo(plane.dtype).min / 2


def _rotation(position_embeddings: tuple[torch.Tensor, torch.Tensor], length: int) -> torch.Tensor:
    """RoPE as complex multipliers (L × d/2) from the (cos, sin) the model passes to its blocks (rotate-half layout)."""
    cos, sin = (t.reshape(-1, t.shape[-2], t.shape[-1])[0, :length].float() for t in position_embeddings)
    half = cos.shape[-1] // 2
    if not (torch.allclose(cos[:, :half], cos[:, half:]) and torch.allclose(sin[:, :half], sin[:, half:])):
        raise UserError("This model's rotary embedding layout is not supported by the row Hessians "
                        "(expected the rotate-half layout of Llama, Mistral and Qwen).")
    return torch.complex(cos[:, :half], sin[:, :half])


def geometry_for(mask: torch.Tensor, position_embeddings, head_dim: int,
                 cache: dict[tuple, AttentionGeometry]) -> AttentionGeometry:
    """The geometry of a batch, shared by all blocks with the same mask and length (cached in `cache`)."""
    visible = _visible(mask)
    key = (visible.shape[0], hashlib.sha1(visible.cpu().numpy().tobytes()).hexdigest(),
           position_embeddings is not None)
    if key not in cache:
        rotation = None if position_embeddings is None else _rotation(position_embeddings, visible.shape[0])
        cache[key] = AttentionGeometry(visible, None if rotation is None else rotation.to(visible.device), head_dim)
    return cache[key]


def mapped_second_moment(vectors: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Σ over the batch and positions of the rotation-mapped, pair-weighted outer products, in complex form.

    `vectors`: (m, L, d) real (m = segments × heads pooled into one Hessian); returns the Hermitian and pseudo parts
    stacked as (2, d/2, d/2) complex; `complex_to_real` turns a sum of these into the d × d matrix.
    """
    half = vectors.shape[-1] // 2
    xi = torch.complex(vectors[..., :half].float(), vectors[..., half:].float()).transpose(0, 1)  # (L, m, d/2)
    hermitian = (xi.transpose(1, 2) @ xi.conj()) * tables[0]  # per position: Σ_m ξ_a conj(ξ_b), weighted
    pseudo = (xi.transpose(1, 2) @ xi) * tables[1]
    return torch.stack([hermitian.sum(0), pseudo.sum(0)])


def complex_to_real(parts: torch.Tensor) -> torch.Tensor:
    """(…, 2, d/2, d/2) Hermitian/pseudo parts → (…, d, d) real second moment."""
    hermitian, pseudo = parts[..., 0, :, :], parts[..., 1, :, :]
    top = torch.cat([(hermitian.real + pseudo.real) / 2, (pseudo.imag - hermitian.imag) / 2], dim=-1)
    bottom = torch.cat([(hermitian.imag + pseudo.imag) / 2, (hermitian.real - pseudo.real) / 2], dim=-1)
    return torch.cat([top, bottom], dim=-2)


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
    lm_trace: dict[str, float] = field(default_factory=dict)  # APTQ tr(H_LM) per layer
    lm_trace_se: dict[str, float] = field(default_factory=dict)  # its standard error
    # "attention" / "mlp": median over tokens of ‖h‖² of the residual stream just after that module's output is added
    residual: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectOptions:
    attention: bool = True  # value and row Hessians
    probes: int = DEFAULT_PROBES  # Hutchinson probes per segment; 0 = no LM traces
    seed: int = 0


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
        self.layers: list[LinearLayer] = arch.block_layers(step.index)
        self.by_kind = {layer.kind: layer for layer in self.layers}
        self.geometry_cache = {} if geometry_cache is None else geometry_cache
        self.tokens = 0
        self.segments = 0
        self.group_leaders = {}  # input group → first layer reading it
        for layer in self.layers:
            self.group_leaders.setdefault(INPUT_GROUPS[layer.kind], layer)
        # Running sums: per input group Σ x xᵀ; "value": Σ_h Σ (A_h Xᵀ)ᵀ(A_h Xᵀ) per KV head (n_kv × d_in × d_in);
        # "row_q"/"row_k": complex parts of the mapped second moments per KV head (n_kv × 2 × d/2 × d/2).
        self._sums: dict[str, torch.Tensor] = {}
        self._lm: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in self.layers}  # per-segment mean ‖g‖²
        self._inputs: dict[str, torch.Tensor] = {}  # per batch: module path → input
        self._outputs: dict[str, torch.Tensor] = {}  # per batch: module path → output
        self._attention: tuple | None = None  # per batch: (query, key, probs, scaling, mask)
        self._residual: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}  # per-token ‖h‖²
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

    def _record_attention(self, query, key, probs, scaling, mask) -> None:
        self._attention = (query, key, probs, scaling, mask)

    def __enter__(self) -> "HessianCollector":
        self._stack = ExitStack()
        cut_paths = {layer.module_path for layer in self.layers if layer.kind in MODULE_INPUTS}
        for path in dict.fromkeys(layer.module_path for layer in self.layers):
            module = self.step.block.get_submodule(path[len(self._block_prefix()):])
            handles = (module.register_forward_pre_hook(self._pre_hook(path, path in cut_paths)),
                       module.register_forward_hook(self._forward_hook(path)))
            for handle in handles:
                self._stack.callback(handle.remove)
        if self.options.attention:
            attention = self.step.block.get_submodule(self.arch.attention_attr)
            self._stack.enter_context(recording_attention(attention, self._record_attention))
        return self

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
            if self.options.attention:
                self._accumulate_attention(inputs, length)
            self._accumulate_residual(batch, output)
        if self.options.probes > 0:
            self._accumulate_traces(batch, inputs, n, length)
        self.tokens += n * length
        self.segments += n
        self._inputs, self._outputs, self._attention = {}, {}, None
        return output.detach()

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def _accumulate_layerwise(self, inputs: dict[str, torch.Tensor]) -> None:
        for group, layer in self.group_leaders.items():
            x = inputs[layer.module_path].reshape(-1, inputs[layer.module_path].shape[-1])
            if not torch.isfinite(x).all():
                raise UserError(f"The input of {layer.name} (block {self.step.index}) contains NaN or infinite "
                                f"values; the model is numerically unstable on this calibration data.")
            self._add(group, x.T @ x)

    def _accumulate_attention(self, inputs: dict[str, torch.Tensor], length: int) -> None:
        query, key, probs, scaling, mask = self._attention
        arch = self.arch
        repeats = arch.n_heads // arch.n_kv_heads
        x_v = inputs[self.by_kind["v"].module_path]  # (n, L, d_in)
        probs = probs.detach().float()
        # Queries as they enter the score with the standard 1/√d_h: OPT scales q before the attention function; a
        # further scale (GPT-2's optional 1/(layer+1)) is folded into q (our choice).
        query = query.detach().float() * (scaling * math.sqrt(arch.head_dim))
        key = key.detach().float()
        rope = self.step.call_kwargs.get("position_embeddings") if arch.rope else None
        geometry = geometry_for(mask, rope, arch.head_dim, self.geometry_cache)
        value, row_q, row_k = [], [], []
        for g in range(arch.n_kv_heads):  # one KV group at a time bounds the memory of A_h Xᵀ
            heads = slice(g * repeats, (g + 1) * repeats)
            y = (probs[:, heads] @ x_v[:, None]).reshape(-1, x_v.shape[-1])  # rows of A_h Xᵀ, all heads of g
            value.append(y.T @ y)
            row_q.append(mapped_second_moment(key[:, g], geometry.key_tables))
            row_k.append(mapped_second_moment(query[:, heads].reshape(-1, length, arch.head_dim),
                                              geometry.query_tables))
        self._add("value", torch.stack(value))
        self._add("row_q", torch.stack(row_q))
        self._add("row_k", torch.stack(row_k))

    def _accumulate_residual(self, batch: Batch, output: torch.Tensor) -> None:
        """Per-token ‖h‖² of the residual stream after the attention add (block input + attention output) and after
        the MLP add (the block output), as pre-norm blocks sum them."""
        attention_out = self._outputs[self.by_kind["o"].module_path].detach().reshape_as(batch.hidden)
        for module, stream in (("attention", batch.hidden + attention_out), ("mlp", output.detach())):
            self._residual[module].append(stream.float().square().sum(-1).flatten().cpu())

    def _accumulate_traces(self, batch: Batch, inputs: dict[str, torch.Tensor], n: int, length: int) -> None:
        """Hutchinson: per segment, ‖∂(uᵀF)/∂W‖² for Rademacher u on the attention and MLP outputs."""
        paths = list(dict.fromkeys(layer.module_path for layer in self.layers))
        module_outputs = [self._outputs[path] for path in paths]
        # F: the attention output (after the out projection) and the MLP output (after the down projection).
        ends = [self._outputs[self.by_kind["o"].module_path], self._outputs[self.by_kind["down"].module_path]]
        d_model = self.arch.hidden_size
        sums = {layer.name: torch.zeros(n, device=batch.hidden.device) for layer in self.layers}
        for probe in range(self.options.probes):
            objective = 0.0
            for end_index, output in enumerate(ends):
                signs = torch.stack([rademacher((length, d_model), _probe_seed(
                    self.options.seed, self.step.index, segment, probe, end_index), output.device)
                    for segment in batch.segments])
                objective = objective + (signs.to(dtype=output.dtype).reshape_as(output) * output).sum()
            grads = torch.autograd.grad(objective, module_outputs, retain_graph=probe + 1 < self.options.probes)
            by_path = dict(zip(paths, grads))
            with torch.no_grad():
                for layer in self.layers:
                    delta = by_path[layer.module_path].reshape(n, length, -1).float()
                    if layer.rows is not None:
                        delta = delta[..., layer.rows[0]:layer.rows[1]]
                    gradient = delta.transpose(1, 2) @ inputs[layer.module_path]  # (n, d_out, d_in) per segment
                    sums[layer.name] += gradient.square().sum((1, 2))
        for name, total in sums.items():  # probes are seeded per segment: results do not depend on the batch size
            self._lm[name].append((total / self.options.probes).cpu())

    # -- results -------------------------------------------------------------------------------------------------

    def result(self) -> BlockHessians:
        if self.tokens == 0:
            raise ValueError("no batch was processed")
        scale = 2.0 / self.tokens
        shared = {group: (self._sums[group] * scale).cpu() for group in self.group_leaders}
        hessians = BlockHessians(self.step.index, self.tokens,
                                 {layer.name: shared[INPUT_GROUPS[layer.kind]] for layer in self.layers})
        hessians.residual = {module: torch.cat(norms).median().item() for module, norms in self._residual.items()}
        if self.options.attention:
            repeats = self.arch.n_heads // self.arch.n_kv_heads
            hessians.value[self.by_kind["v"].name] = (self._sums["value"] * (scale / repeats)).cpu()
            row_q = complex_to_real(self._sums["row_q"]) / self.segments
            hessians.row[self.by_kind["q"].name] = row_q.repeat_interleave(repeats, dim=0).cpu()
            row_k = complex_to_real(self._sums["row_k"]) / (self.segments * repeats)
            hessians.row[self.by_kind["k"].name] = row_k.cpu()
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
