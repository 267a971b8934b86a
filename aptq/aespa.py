"""aespa's own quantizer: rounding optimised under the attention-wise objective (docs/algorithms.md §13).

Per layer, the rounding of a starting solution (attention-aware GPTQ, or round-to-nearest) is relaxed AdaRound-style
and optimised by gradient descent on the layer's Kronecker-factored objective — never a forward pass:

- q, k: `tr(G ΔW H ΔWᵀ)`, G the row Hessian of each head (§2), H the layer-wise Hessian;
- v: `Σ_g tr(G_O,g ΔW_g H_V,g ΔW_gᵀ)`, H_V,g per KV head g and the out projection's row factor
  `G_O,g = Σ_{h ∈ group g} W_O,hᵀ W_O,h` (full-precision W_O);
- o and the MLP: `tr(ΔW H ΔWᵀ)`.

The objective's gradient is closed-form, `2 G ΔW H` (G, H symmetric): one product per head and iteration (and one
more, in float64, for the loss at each check of the hard rounding). The grid (scales, zero points) is the starting
solution's own; with `learn_scales` each row-group's scale gets a learned factor as well, rounded up to float16 at the
end. The result lies on a grid of `QuantConfig` with float16 scales, so `recover_codes` reads its codes back and the
packed formats reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aptq.errors import UserError
from aptq.hessian import BlockHessians
from aptq.models import LinearLayer
from aptq.quantizer import QuantConfig, fp16_ceil, group_width, recover_codes

# AdaRound's rectified sigmoid h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1): it reaches 0 and 1 at finite V.
ZETA, GAMMA = 1.1, -0.1
STARTS = ("attention", "rtn")
# (our choice) the hard rounding is evaluated this many times along the schedule and the best kept (one product each)
HARD_CHECKS = 10
INITIAL_H = 0.9  # h(V) at iteration 0 where the start took the upper code (1 − this for the lower)
# (our choice, measured in bench/results/aespa.md) iterations per layer that fit a CPU session for the embedded model;
# from WIDE_FROM bits fewer (our choice: the optimiser refines little beyond the start there, and at 3 bits 50 gave a
# lower KL on held-out calibration windows than 100 on both models, bench/results/peers*.md). GPU_ITERATIONS is
# AdaRound's published setting (its reference implementation's default as well).
CPU_ITERATIONS = 100
CPU_WIDE_ITERATIONS = 50
WIDE_FROM = 3
GPU_ITERATIONS = 10_000


@dataclass(frozen=True)
class AespaOptions:
    """The optimiser's settings; the defaults are the CPU setting (docs/algorithms.md §13 has the reasons)."""

    # per layer, at every width; None: the CPU setting, CPU_ITERATIONS below WIDE_FROM bits, CPU_WIDE_ITERATIONS from it
    iterations: int | None = None
    start: str = "attention"  # the starting solution: attention-aware GPTQ ("attention") or round-to-nearest ("rtn")
    # also learn a factor on each row-group's scale; (our choice) on by default: chosen on held-out calibration windows
    # at 2 and 3 bits on the embedded model (bench/results/peers.md, docs/algorithms.md §13)
    learn_scales: bool = True
    learning_rate: float = 0.03  # Adam, on the rounding variables V (and the scales' log-factors)
    regulariser: float = 30.0  # λ of the rounding regulariser, against the start-normalised objective
    warmup: float = 0.0  # fraction of the iterations without the regulariser (AdaRound's is 0.2)
    beta: tuple[float, float] = (20.0, 2.0)  # the regulariser's exponent, annealed linearly (AdaRound's)

    @staticmethod
    def for_device(device: str, iterations: int | None = None) -> AespaOptions:
        """The options for a compute device: `iterations`, or the CPU's setting by width or the GPU's."""
        if iterations is None and torch.device(device).type != "cpu":
            iterations = GPU_ITERATIONS
        return AespaOptions(iterations=iterations)

    def iterations_for(self, bits: int) -> int:
        """The iterations of a layer of this width."""
        if self.iterations is not None:
            return self.iterations
        return CPU_ITERATIONS if bits < WIDE_FROM else CPU_WIDE_ITERATIONS

    def __post_init__(self) -> None:
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 0):
            raise UserError(f"The aespa iterations must be a whole number ≥ 0, got {self.iterations!r}.")
        if self.start not in STARTS:
            raise UserError(f"The aespa start must be one of {', '.join(STARTS)}, got {self.start!r}.")


@dataclass(frozen=True)
class AttentionObjective:
    """`Σ_h tr(G_h ΔW_h C_h ΔW_hᵀ)` over the heads h of a layer whose rows are ordered head by head.

    `column`: (1 or n_heads, d_in, d_in), one column Hessian shared by all rows or one per head; `row`:
    (n_heads, d_h, d_h) row factors, or None for the identity (o, MLP). Both symmetric."""

    column: Tensor
    row: Tensor | None = None

    @property
    def n_heads(self) -> int:
        return self.column.shape[0] if self.row is None else self.row.shape[0]

    def product(self, delta: Tensor) -> Tensor:
        """`G ΔW C` per head (d_out × d_in): half the objective's gradient, from one product per head."""
        heads = delta.reshape(self.n_heads, -1, delta.shape[1])
        product = heads @ self.column
        return (product if self.row is None else self.row @ product).reshape(delta.shape)

    def loss_and_gradient(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The loss of ΔW (d_out × d_in), `Σ ΔW ⊙ G ΔW C`, and its gradient `2 G ΔW C`."""
        product = self.product(delta)
        return (delta * product).sum(), 2 * product

    def double(self) -> AttentionObjective:
        """The objective in float64, for exact losses (built once: `loss` on it copies nothing)."""
        return AttentionObjective(self.column.double(), None if self.row is None else self.row.double())

    def loss(self, W: Tensor, Wq: Tensor) -> float:
        """The loss of a quantized weight, in float64."""
        return float(self.double().loss_and_gradient(Wq.double() - W.double())[0])


@dataclass(frozen=True)
class AespaResult:
    """The dequantized weights, their loss, the starting solution's loss, and whether the start was kept."""

    weight: Tensor
    loss: float
    start_loss: float
    kept_start: bool


def out_row_factor(out_weight: Tensor, n_kv_heads: int, head_dim: int) -> Tensor:
    """`G_O,g = Σ_{h ∈ group g} W_O,hᵀ W_O,h` (n_kv × d_h × d_h), W_O,h the d_model × d_h columns reading head h.

    (our choice) with GQA, the sum over the r query heads of the group: KV head g's values reach every one of them,
    and each adds its own out-projection slice to the output, so the exact loss sums over them. The collector keeps
    one `H_V,g` per KV head (the group's mean of `X A_hᵀ A_h Xᵀ`), so the sum of the row factors times that mean is
    the Kronecker form that is exact when the group's heads attend alike. Cross terms between heads, which the
    out projection adds together, are left out, as aespa treats each head's output on its own."""
    n_heads = out_weight.shape[1] // head_dim
    if out_weight.shape[1] != n_heads * head_dim or n_heads % n_kv_heads:
        raise ValueError(f"The out projection's {out_weight.shape[1]} input columns do not split into query heads of "
                         f"{head_dim} that the {n_kv_heads} KV heads share.")
    weight = out_weight.to(torch.promote_types(out_weight.dtype, torch.float32))  # bf16/fp16 → float32
    slices = weight.reshape(out_weight.shape[0], n_heads, head_dim).transpose(0, 1)  # h × d_model × d_h
    per_head = slices.transpose(1, 2) @ slices
    return per_head.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, head_dim).sum(dim=1)


def layer_objective(layer: LinearLayer, weight: Tensor, hessians: BlockHessians,
                    out_weight: Tensor | None) -> AttentionObjective:
    """The layer's attention-wise objective from the block's Hessians, on the weight's device (module docstring)."""
    device = weight.device
    if layer.name in hessians.value:
        if out_weight is None:
            raise ValueError(f"The value projection {layer.name} needs the out projection's weight.")
        value = hessians.value[layer.name].to(device)
        head_dim = weight.shape[0] // value.shape[0]
        return AttentionObjective(value, out_row_factor(out_weight.to(device), value.shape[0], head_dim))
    column = hessians.column(layer.name).to(device).unsqueeze(0)
    if layer.name in hessians.row:
        return AttentionObjective(column, hessians.row[layer.name].to(device))
    return AttentionObjective(column)


def _rectified_sigmoid(V: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    return torch.logit((h - GAMMA) / (ZETA - GAMMA))


def grouped_columns(t: Tensor, width: int) -> Tensor:
    """d_out × d_in → d_out × n_groups × width, the last group zero-padded where the width does not divide d_in (a view
    otherwise)."""
    padding = -t.shape[1] % width
    return (torch.nn.functional.pad(t, (0, padding)) if padding else t).reshape(t.shape[0], -1, width)


@dataclass(frozen=True)
class GroupedGrid:
    """A start's grid held group by group, float32 on the weight's device: what both rounding optimisers begin from
    (here and aptq.blockwise)."""

    width: int  # columns per group (`group_width`)
    scale: Tensor  # d_out × n_groups × 1
    zero: Tensor  # d_out × n_groups × 1
    codes: Tensor  # d_out × n_groups × width (padding columns 0)

    @staticmethod
    def of(W: Tensor, start: Tensor, cfg: QuantConfig) -> GroupedGrid:
        """The grid `start` lies on (`recover_codes`), for a d_out × d_in weight `W` quantized to `start`."""
        grid = recover_codes(start, cfg)
        width = group_width(W.shape[1], cfg)
        return GroupedGrid(width, grid.scales.float().to(W.device).unsqueeze(-1),
                           grid.zeros.float().to(W.device).unsqueeze(-1),
                           grouped_columns(grid.codes.float().to(W.device), width))


@dataclass(frozen=True)
class _Relaxation:
    """The start's grid and, per weight, the two codes the rounding chooses between: `base` and `base + 1`, with the
    starting choice `up`.

    (our choice) the pair is the start's code and its neighbour toward the full-precision weight (on the grid's
    scale, `t = w / s + z`): where the start rounded to nearest or to the other side of w, that is AdaRound's
    floor/ceil pair; where GPTQ moved a code further, the choice is between it and the code one step back toward w.

    Every per-weight tensor is held group by group (`grouped_columns`), so that a row-group's scale broadcasts over its
    weights and the scale's gradient is a sum over the last axis: no gather or scatter per iteration. Padding weights
    have `free` 0 and `fixed` 0: they never move and add nothing."""

    d_in: int
    group_scale: Tensor  # d_out × n_groups × 1, float16 values in float32
    up: Tensor  # d_out × n_groups × width, bool: the start took base + 1
    fixed: Tensor  # the level at h = 0: `clamp(base, 0, 2^b − 1) − z`
    free: Tensor  # 1 where both codes of the pair are on the grid (h moves the level), else 0

    @staticmethod
    def of(W: Tensor, start: Tensor, cfg: QuantConfig) -> _Relaxation:
        grid = GroupedGrid.of(W, start, cfg)
        up = grid.codes > grouped_columns(W.float(), grid.width) / grid.scale + grid.zero
        base = grid.codes - up.float()
        real = grouped_columns(torch.ones_like(W, dtype=torch.float32), grid.width)
        fixed = (torch.clamp(base, 0, cfg.max_level) - grid.zero) * real
        free = ((base >= 0) & (base < cfg.max_level)).float() * real
        return _Relaxation(W.shape[1], grid.scale, up, fixed, free)

    def grouped(self, t: Tensor) -> Tensor:
        return grouped_columns(t, self.fixed.shape[-1])

    def flat(self, t: Tensor) -> Tensor:
        """The inverse of `grouped`: d_out × d_in (a view where no group is padded)."""
        return t.reshape(t.shape[0], -1)[:, :self.d_in]

    def initial_variables(self) -> Tensor:
        """V with h(V) = 0.9 where the start took base + 1 and 0.1 where it took base: hard rounding at iteration 0
        gives the start back exactly, and every h has a gradient (the rectified sigmoid is flat at 0 and 1).

        (our choice) not AdaRound's init (h at w's own position between the codes, i.e. the soft weights equal w):
        GPTQ's codes compensate each other, and on a 2-bit query layer of the embedded model that init starts 8×
        above the start's loss and never comes back below it; starting next to the start's codes does."""
        return _inverse_rectified_sigmoid(torch.where(self.up, INITIAL_H, 1 - INITIAL_H))

    def levels(self, h: Tensor) -> Tensor:
        """`clamp(base + h, 0, 2^b − 1) − z`: soft for h in (0, 1), integers for h in {0, 1}. A weight whose pair
        leaves the grid (base −1 or 2^b − 1) stays at its one code on the grid whatever h."""
        return torch.addcmul(self.fixed, self.free, h)

    def scales(self, log_factor: Tensor) -> Tensor:
        """Each row-group's scale times its learned factor, d_out × n_groups × 1 (broadcast over the group)."""
        return self.group_scale * log_factor.exp().unsqueeze(-1)


def _beta(options: AespaOptions, iteration: int, iterations: int) -> float | None:
    """The regulariser's exponent at this iteration of `iterations`, None during the warm-up (AdaRound's linear
    decay)."""
    warm = int(options.warmup * iterations)
    if iteration < warm:
        return None
    progress = (iteration - warm) / max(1, iterations - warm)
    start, end = options.beta
    return end + (start - end) * (1 - progress)


def _gradients(V: Tensor, log_factor: Tensor, relaxed: _Relaxation, weights: Tensor, objective: AttentionObjective,
               start_loss: float, beta: float | None, options: AespaOptions) -> tuple[Tensor, Tensor | None]:
    """Gradients of `L(ΔW) / L_start + λ · mean(1 − |2h − 1|^β)` with respect to V and the scales' log-factors (all
    grouped as in `_Relaxation`), by the chain rule written out: ΔW = s · (fixed + free · h(V)) − W, ∇L = 2 G ΔW C.
    (Written out, with the constants folded and the steps in place, because these elementwise passes cost more than
    the objective's product on a CPU; autograd takes twice as many.)"""
    sigmoid = torch.sigmoid(V)
    h = (sigmoid * (ZETA - GAMMA)).add_(GAMMA).clamp_(0, 1)
    scale = relaxed.scales(log_factor)
    levels = relaxed.levels(h)
    residual = torch.addcmul(weights, scale, levels, value=-1)  # W − Ŵ = −ΔW
    product = relaxed.grouped(objective.product(relaxed.flat(residual)))  # G (−ΔW) C = −∇L / 2
    # ∂/∂h times the stretch ζ − γ of h(V), folded into the constants here and in the regulariser's step
    d_h = (product * (scale * (-2 * (ZETA - GAMMA) / start_loss))).mul_(relaxed.free)
    if beta is not None:  # d/dh of λ · mean(1 − |u|^β), u = 2h − 1: −2λβ sign(u) |u|^(β−1) / n
        u = (h * 2).sub_(1)
        n = u.shape[0] * relaxed.d_in  # the mean over the layer's weights, not the padding
        d_h.sub_(u.abs().pow_(beta - 1).copysign_(u), alpha=2 * options.regulariser * beta * (ZETA - GAMMA) / n)
    inside = (h > 0) & (h < 1)  # dh/dV is 0 where the rectified sigmoid is clamped
    d_V = torch.where(inside, d_h.mul_(torch.addcmul(sigmoid, sigmoid, sigmoid, value=-1)), 0)  # σ' = σ − σ²
    if not options.learn_scales:
        return d_V, None
    return d_V, (product * levels).sum(dim=-1) * (scale.squeeze(-1) * (-2 / start_loss))  # ds/da = s


def optimise_rounding(W: Tensor, start: Tensor, objective: AttentionObjective, cfg: QuantConfig,
                      options: AespaOptions = AespaOptions()) -> AespaResult:
    """The rounding of `start` (on a grid of cfg) optimised under `objective` (module docstring), hard-rounded.

    Minimises `L(ΔW) / L(ΔW_start) + λ · mean(1 − |2h − 1|^β)` with Adam, β annealed (after the warm-up, if any),
    then takes each weight's nearer code (h ≥ ½). (our choice) the objective is normalised by the start's loss so
    that λ and the learning rate mean the same on every layer. (our choice) the hard rounding is taken every tenth
    of the schedule and the best one kept, the start included: the optimiser never makes a layer worse under its own
    objective, and a schedule whose last iterations drift does not lose what it found before."""
    exact = objective.double()
    start_loss = exact.loss(W, start)
    iterations = options.iterations_for(cfg.bits)
    if iterations == 0 or start_loss <= 0:
        return AespaResult(start.to(W.dtype), start_loss, start_loss, True)
    relaxed = _Relaxation.of(W, start, cfg)
    weights = relaxed.grouped(W.float())
    V = relaxed.initial_variables()
    log_factor = torch.zeros(relaxed.group_scale.shape[:2], device=W.device)
    parameters = [V, log_factor] if options.learn_scales else [V]
    # fused: one pass per step instead of Adam's dozen (the same update, to float rounding)
    optimiser = torch.optim.Adam(parameters, lr=options.learning_rate, fused=W.device.type in ("cpu", "cuda"))
    best = AespaResult(start.to(W.dtype), start_loss, start_loss, True)
    checks = max(1, iterations // HARD_CHECKS)
    for iteration in range(iterations):
        V.grad, log_factor.grad = _gradients(V, log_factor, relaxed, weights, objective, start_loss,
                                             _beta(options, iteration, iterations), options)
        optimiser.step()
        if (iteration + 1) % checks == 0 or iteration + 1 == iterations:
            scale = fp16_ceil(relaxed.scales(log_factor)) if options.learn_scales else relaxed.group_scale
            hard = relaxed.flat(scale * relaxed.levels((V >= 0).float())).contiguous()  # h(V) ≥ ½ iff V ≥ 0
            loss = exact.loss(W, hard)
            if loss < best.loss:
                best = AespaResult(hard.to(W.dtype), loss, start_loss, False)
    return best
