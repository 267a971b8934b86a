"""Block refinement (our choice, beyond the three papers; docs/algorithms.md §18): after the layer-wise quantizer has
chosen a block's weights, their codes and group scales are tuned jointly on the block's output.

The layer-wise objectives (GPTQ's, the attention-aware ones, aespa's) fit each layer alone through a quadratic model of
its error; the block's nonlinearities (softmax, the gated activation, the norms) and the interplay of its layers are
left out. Here every quantized layer of the block keeps its grid, and two things move:

- each weight's code, `clamp(round(w / s + z + o + v), 0, 2^b − 1)`: `o` the integer by which the layer-wise solution
  moved the code away from round-to-nearest (so that v = 0 gives that solution back exactly), v ∈ [−½, ½] learned;
- each row-group's scale, `s = s₀ · exp(a)`, a ∈ [−½, ½] learned; the zero point z stays.

The loss is the mean squared error of the block's output, on the quantized model's inputs, against the full-precision
model's output of the block on its own inputs (the full-precision stream, where the walk carries it; else the
full-precision block on the quantized inputs). Rounding passes the gradient straight through; the steps are signed
gradient steps whose size decays linearly to 0, one batch of calibration segments per step (auto-round's optimiser,
started here from the layer-wise solution instead of round-to-nearest). (our choice) The result is kept only where
it lowers the loss over all calibration batches below the layer-wise solution's, so refinement never makes a block
worse on the data it saw.

The refined weights lie on a grid of the same `QuantConfig` with float16 scales, so `recover_codes` reads their codes
back and the packed formats reproduce them. Layers that are one expert of a mixture keep their layer-wise weights (the
experts' parameters are shared 3-D tensors; our choice, not measured).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from aptq.aespa import GroupedGrid, grouped_columns
from aptq.capture import BlockStep
from aptq.errors import UserError
from aptq.models import Architecture, LinearLayer, get_weight
from aptq.progress import Progress, no_progress
from aptq.quantizer import QuantConfig, fp16_ceil

OFFSET_BOUND = 0.5  # |v|: the code moves at most one step from the layer-wise solution's
SCALE_BOUND = 0.5  # |a|: each scale within a factor e^±½ of the layer-wise solution's
PROGRESS_EVERY = 10  # iterations between progress reports (and chances to cancel)


@dataclass(frozen=True)
class BlockRefinement:
    """How the block's codes and scales are refined; `iterations` 0: not at all."""

    iterations: int = 0  # signed-gradient steps per block, one calibration batch each
    learning_rate: float | None = None  # the first step's size, decaying linearly to 0; None: 1 / iterations

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise UserError(f"The block refinement's iterations must be a whole number ≥ 0, got {self.iterations!r}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"The block refinement's learning rate must be above 0, got {self.learning_rate!r}.")

    @property
    def step_size(self) -> float:
        return self.learning_rate if self.learning_rate is not None else 1 / max(1, self.iterations)


class _LayerGrid:
    """One layer's grid and learned variables, held group by group (aptq.aespa.GroupedGrid)."""

    def __init__(self, original: Tensor, start: Tensor, cfg: QuantConfig) -> None:
        grid = GroupedGrid.of(original, start, cfg)
        self.d_in = original.shape[1]
        self.max_level = cfg.max_level
        self.weight = grouped_columns(original.detach().float(), grid.width)
        self.scale, self.zero = grid.scale, grid.zero
        # the integer shift from round-to-nearest to the start's codes: v = 0, a = 0 give the start back
        self.shift = grid.codes - torch.round(self.weight / self.scale + self.zero)
        # where a position sits exactly half-way, rounding may take the other code: nudge v toward the start's
        position = self.weight / self.scale + self.zero + self.shift
        self.offset = torch.where(torch.round(position) == grid.codes, 0,
                                  (grid.codes - position) * 1e-3).requires_grad_()
        self.log_factor = torch.zeros(self.scale.shape, device=original.device, requires_grad=True)

    def _weight(self, scale: Tensor, straight_through: bool) -> Tensor:
        position = self.weight / scale + self.zero + self.shift + self.offset
        rounded = torch.round(position)
        if straight_through:
            rounded = position + (rounded - position).detach()
        codes = torch.clamp(rounded, 0, self.max_level)
        return (scale * (codes - self.zero)).reshape(self.weight.shape[0], -1)[:, :self.d_in]

    def relaxed(self) -> Tensor:
        """The weights as the optimiser sees them (float32 scales, gradients straight through the rounding)."""
        return self._weight(self.scale * self.log_factor.exp(), straight_through=True)

    @torch.no_grad()
    def hard(self) -> Tensor:
        """The weights on the grid: float16 scales (rounded up, as the quantizer's), integer codes."""
        return self._weight(fp16_ceil(self.scale * self.log_factor.exp()), straight_through=False)

    @torch.no_grad()
    def step(self, size: float) -> None:
        for variable, bound in ((self.offset, OFFSET_BOUND), (self.log_factor, SCALE_BOUND)):
            if variable.grad is not None:
                variable.sub_(variable.grad.sign(), alpha=size).clamp_(-bound, bound)
                variable.grad = None


def _parameters(step: BlockStep, arch: Architecture, layers: list[LinearLayer],
                weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The block's parameters with the given layers' weights put in (differentiably), by name relative to the block;
    every other parameter detached, so that no gradient is taken for it."""
    prefix = f"{arch.blocks_path}.{step.index}."
    parameters = {name: tensor.detach() for name, tensor in step.block.named_parameters()}
    for layer in layers:
        name = f"{layer.module_path.removeprefix(prefix)}.{layer.parameter}"
        stored = parameters[name]
        matrix = stored.t() if layer.transposed else stored  # d_out × d_in
        value = weights[layer.name].to(stored.dtype)
        matrix = value if layer.rows is None else matrix.index_put((layer.rows.index(stored.device),), value)
        parameters[name] = matrix.t() if layer.transposed else matrix
    return parameters


def _forward(step: BlockStep, parameters: dict[str, Tensor], batch) -> Tensor:
    output = functional_call(step.block, parameters, (batch.hidden, *batch.args), batch.kwargs)
    return (output[0] if isinstance(output, (tuple, list)) else output).float()


@torch.no_grad()
def _targets(step: BlockStep) -> list[Tensor]:
    """The full-precision block's output per batch, on the CPU: on the full-precision stream's inputs where the walk
    carries it, else on the quantized stream's. The block's own weights are the full-precision ones here. Kept in the
    dtype the block computes in (half the memory of float32 for a bfloat16 model, nothing lost: the forward's output
    has no more precision); the losses read them as float32."""
    source = step.reference or step
    return [source.forward(batch).cpu() for batch in source.batches()]


@contextmanager
def _fused_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model's attention computed by PyTorch's fused kernel for the duration, where the model supports it: the
    same function of the same inputs and mask (up to float rounding); with its backward pass 1.15× faster than the eager
    kernel on a CPU, 2.2× with the steps' bfloat16 (bench/results/blockwise_step.md)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = False
    if current not in (None, "sdpa") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
            switched = True
        except (ValueError, ImportError):  # a family without it keeps its own
            pass
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(current)


def refine_block(step: BlockStep, model: torch.nn.Module, arch: Architecture, todo: list[tuple[LinearLayer, int]],
                 weights: dict[str, Tensor], configs: dict[str, QuantConfig], refinement: BlockRefinement,
                 progress: Progress = no_progress, n_blocks: int = 1) -> tuple[dict[str, Tensor], str | None]:
    """The block's weights with codes and scales refined on the block's output (module docstring), and None; or, where
    the refinement found nothing better, the layer-wise `weights` unchanged and a note that says so. The model's own
    weights are never modified."""
    layers = [layer for layer, _ in todo if layer.expert is None and layer.name in weights]
    if refinement.iterations == 0 or not layers:
        return weights, None
    grids = {layer.name: _LayerGrid(get_weight(model, layer).to(step.device), weights[layer.name].float()
                                    .to(step.device), configs[layer.name]) for layer in layers}

    def loss_over_batches(current: dict[str, Tensor]) -> float:
        parameters = _parameters(step, arch, layers, current)
        total = 0.0
        with torch.no_grad():
            for batch, target in zip(step.batches(), targets):
                total += torch.nn.functional.mse_loss(_forward(step, parameters, batch),
                                                      target.to(step.device, torch.float32), reduction="sum").item()
        return total

    with _fused_attention(model):
        targets = _targets(step)
        start_loss = loss_over_batches({name: grid.hard() for name, grid in grids.items()})
        for iteration in range(refinement.iterations):
            index = iteration % step.n_batches
            # (our choice, as auto-round) the steps' forward and backward in bfloat16 where the kernels allow it:
            # 1.9× faster than float32 on a CPU (bench/results/blockwise_step.md); the signs of the gradients are all
            # the steps use, and the losses that decide what is kept are float32
            with torch.autocast(step.device.type, dtype=torch.bfloat16):
                relaxed = {name: grid.relaxed() for name, grid in grids.items()}
                output = _forward(step, _parameters(step, arch, layers, relaxed), step.batch(index))
            torch.nn.functional.mse_loss(output, targets[index].to(step.device, torch.float32)).backward()
            size = refinement.step_size * (1 - iteration / refinement.iterations)
            for grid in grids.values():
                grid.step(size)
            if (iteration + 1) % PROGRESS_EVERY == 0:
                progress(step.index, n_blocks, f"block {step.index + 1}/{n_blocks}: refining, step "
                                              f"{iteration + 1}/{refinement.iterations}")
        refined = {name: grid.hard() for name, grid in grids.items()}
        refined_loss = loss_over_batches(refined)
    if not refined_loss < start_loss or not math.isfinite(refined_loss):
        return weights, f"Block {step.index}: the refinement found nothing better than the layer-wise solution."
    kept = {name: refined[name].to(weights[name].dtype).to(weights[name].device) for name in refined}
    return {**weights, **kept}, None
