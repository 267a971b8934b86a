"""Full-precision targets: each layer fitted to the full-precision model's output on the quantized model's inputs
(docs/algorithms.md §17; our choice, a share α = 0.25 by default, chosen in bench/results/peers.md).

True-sequential quantization feeds a layer the inputs `x̃` of the partly quantized model; the plain objectives then
ask the quantized layer to reproduce `W x̃`, what the full-precision layer would make of the already damaged inputs.
The full-precision model's own output is `W x`, with `x` the layer's input when no earlier layer is quantized. Fitting
that instead: with `H = (2/N) Σ x̃ x̃ᵀ`, the mismatch moment `D = (2/N) Σ (x − x̃) x̃ᵀ` and the unquantized
least-squares solution `W* = W (H + D) H⁻¹ = W + W D H⁻¹`,

    Σ_t ‖W x_t − Ŵ x̃_t‖²  =  Σ_t ‖W x_t − W* x̃_t‖²  +  (N/2) tr((W* − Ŵ) H (W* − Ŵ)ᵀ),

because the cross term `(W X − W* X̃) X̃ᵀ` vanishes. So any quantizer of the layer's own objective, run on `W*` in
place of `W`, minimises the full-precision-target objective exactly; with row factors (`tr(G ΔW H ΔWᵀ)`, q/k) the
same holds, since G multiplies both terms alike. `H⁻¹` is GPTQ's damped inverse (`+ λ mean(diag H) I`): the damping
acts on the correction `W D H⁻¹` alone, so where the two streams agree (block 0, D = 0) `W* = W` exactly (our
choice, as GPTQ damps). Fitting the full-precision outputs is GPTAQ's idea (asymmetric calibration); here it is the
closed-form target above rather than an update inside the GPTQ loop.

A share α blends the two objectives, `(1 − α) Σ ‖W x̃ − Ŵ x̃‖² + α Σ ‖W x − Ŵ x̃‖²`, whose least-squares optimum is
`W* = W + α W D H⁻¹`, split the same way. (our choice) α is a setting: the correction is a regression of the input
error on `x̃` over `d_in` dimensions, which calibration sets of a few thousand tokens overfit (α = 1 on the embedded
model's 8 × 512 tokens moved the weights of block 5 by 30–60 % and its W3 perplexity from 52 to 1800).

Which layers: every layer but the experts of a mixture (the two streams route tokens differently; they keep their
own objective). Exact for the layers whose column factor is the layer-wise `H`,
and for the out and down projections under the post-norm weighting, whose `H̃` weighs each token by `1/σ(ỹ)²` (§16):
their `D̃` weighs the tokens alike, and the split holds for the weighted sums. (our choice) The value projection under
the attention-aware objective `tr(ΔW H_V ΔWᵀ)` takes its target from the layer-wise moments: a `W*` with
`W* x̃_t ≈ W x_t` token by token also gives `Σ_s a_ts W* x̃_s ≈ Σ_s a_ts W x_s` for any attention weights, so it is a
target for the attention-mixed output too (the change of the attention maps between the streams left out, as for q/k,
whose row factors come from the quantized stream).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from aptq.capture import Batch, BlockStep
from aptq.geometry import inverse_rms
from aptq.gptq import DAMP_RETRIES
from aptq.models import LinearLayer


class MismatchMoments:
    """The mismatch moment `D = (2/N) Σ (x − x̃) x̃ᵀ` per input of the given layers of one block, x from the
    full-precision stream (`step.reference`) and x̃ from the quantized one, batch by batch on the same segments. The
    full-precision stream's outputs are kept as its next block's inputs.

    `normed`: module path → the epsilon of the post-norm that reads that layer's output, for the layers whose column
    factor is the post-norm weighting's `H̃` (docs/algorithms.md §16): their tokens are weighed as in `H̃`,
    `D̃ = (2/N) Σ (x − x̃) x̃ᵀ / σ(ỹ)²`, with ỹ the layer's output on the quantized stream."""

    def __init__(self, step: BlockStep, layers: list[LinearLayer], block_prefix: str,
                 normed: dict[str, float] | None = None) -> None:
        if step.reference is None:
            raise ValueError("Full-precision targets need a walk with the full-precision stream (reference=True).")
        self.step = step
        self.layers = layers
        self.normed = normed or {}
        leaders: dict[str, LinearLayer] = {}  # input group → the first layer reading it, as HessianCollector
        for layer in layers:
            leaders.setdefault(layer.input_group, layer)
        self.paths = {leader.module_path: leader for leader in leaders.values()}
        self.prefix = block_prefix
        self._seen: dict[str, torch.Tensor] = {}  # per batch: module path → full-precision input
        self._sums: dict[str, torch.Tensor] = {}
        self._recording = True
        self.tokens = 0

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if self._recording:
                self._seen[path] = x
                return
            mismatch = self._seen.pop(path) - x
            if path in self.normed:  # 1/σ(ỹ) on each side: 1/σ² per token
                y = output.detach().float().reshape(-1, output.shape[-1])
                inverse_size = inverse_rms(y, self.normed[path]).unsqueeze(-1)
                mismatch, x = mismatch * inverse_size, x * inverse_size
            total = self._sums.setdefault(path, x.new_zeros((x.shape[-1], x.shape[-1])))
            total.addmm_(mismatch.T, x)
        return hook

    @torch.no_grad()
    def collect(self, parts: int = 1, forward: Callable[[Batch], torch.Tensor] | None = None,
                aside: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, torch.Tensor]:
        """Layer name → D (d_in × d_in, float32, CPU); each batch in up to `parts` pieces (a device short of memory).

        `forward` runs a piece on the quantized stream (the block's own forward by default): the pipeline passes the
        Hessian collector's, so that one pass over the quantized stream serves both; `aside()` is a context around
        each full-precision forward (the collector's hooks paused)."""
        reference = self.step.reference
        forward = forward or self.step.forward
        handles = [self.step.block.get_submodule(path[len(self.prefix):]).register_forward_hook(self._hook(path))
                   for path in self.paths]
        try:
            for index in range(self.step.n_batches):
                full_batch, batch = reference.batch(index), self.step.batch(index)
                outputs = []
                for full_piece, piece in zip(reference.split(full_batch, parts), self.step.split(batch, parts)):
                    self._recording = True
                    with aside():
                        outputs.append(reference.forward(full_piece))
                    self._recording = False
                    forward(piece)
                reference.keep_output(full_batch, torch.cat(outputs))
                self.tokens += batch.hidden.shape[0] * batch.hidden.shape[1]
        finally:
            for handle in handles:
                handle.remove()
        scale = 2.0 / self.tokens
        by_group = {leader.input_group: (self._sums[path] * scale).cpu() for path, leader in self.paths.items()}
        return {layer.name: by_group[layer.input_group] for layer in self.layers}


def full_precision_target(weight: torch.Tensor, mismatch: torch.Tensor, hessian: torch.Tensor, damp: float,
                          share: float = 1.0) -> torch.Tensor:
    """`W* = W + α W D (H + λ mean(diag H) I)⁻¹` in float32, D the mismatch moment, α the share (module docstring).

    Where `H + λI` does not factorize, λ is raised ×10 at a time as GPTQ raises it (`DAMP_RETRIES`); where it never
    does, W itself (our choice: the layer keeps its own objective, and GPTQ's fallback on that Hessian follows)."""
    H = hessian.to(weight.device, torch.float32)
    W = weight.float()
    right = mismatch.to(weight.device, torch.float32).T @ W.T  # Dᵀ Wᵀ
    for attempt in range(DAMP_RETRIES):
        damped = H.clone()
        damped.diagonal().add_(damp * 10 ** attempt * H.diagonal().mean())
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return W + share * torch.cholesky_solve(right, factor).T
    return W
