"""Perplexity, KL divergence and top-1 agreement of next-token distributions.

Perplexity follows the GPTQ protocol: non-overlapping windows of `seqlen` tokens, each evaluated independently; it
is exp of the mean negative log-likelihood over every predicted token (the L−1 next-token predictions per window).
KL divergence KL(P_reference ‖ P_model) and top-1 agreement are averaged over the same predicted positions.
Each comes with its per-window means and a standard error of the mean over the windows (`Evaluation.nll_se`,
`kl_se`, `top1_se`): **(our choice)** the windows taken as independent samples of equal weight (every window predicts
the same number of tokens, so the mean of the window means is the mean over positions) — the uncertainty the
Trade-offs page draws as bands. It says how much another draw of windows from the same text could move a measure, not
how much two evaluations on the same windows differ: that is `paired_difference`, the mean of the per-window
differences and its standard error, far smaller where both models find the same windows hard.

Comparing many quantized models with one reference would recompute the reference's logits every time, so the
reference can be summarized once as `ReferenceStats`: its top-k log-probabilities per position (our choice, k = 128).
KL against those stats treats the tokens outside the reference's top k as one bucket; by the log-sum inequality that
is a lower bound of the exact KL, and with k = vocabulary size it is exact (see tests/test_evaluate.py and
bench/results for the measured gap).

Where the forward passes run: on `device` (default: where the model's weights are). When the weights live elsewhere
(a big model kept in CPU memory, one GPU) and the whole model fits in the device's free memory, it is moved there for
the evaluation and back afterwards; when it does not fit, the evaluation walks the decoder block by block over all
windows at once, as the GPTQ reference code does: the activations of every window stay on the host, one block at a
time goes to the device (aptq.capture), and the embeddings, final norm and LM head run on the device at the end.
`weights` (optional) swaps other weights into each block while it runs (a quantized model without a copy of it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from aptq.capture import BlockWalk
from aptq.errors import UserError
from aptq.models import architecture_of
from aptq.progress import Progress, no_progress

DEVICE_HEADROOM = 1.25  # (our choice) the whole model goes to the device only when 1.25 × its size is free there


class BlockWeights(Protocol):
    """Weights to use instead of the model's own in one block while it runs (e.g. a quantization run's)."""

    def swapped(self, model: nn.Module, block: int) -> AbstractContextManager: ...


@dataclass(frozen=True)
class Evaluation:
    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens the mean is taken over
    windows: int
    seqlen: int
    seconds: float
    kl_divergence: float | None = None  # nats per token, against the reference model
    top1_agreement: float | None = None  # fraction of positions where both models' argmax agree
    # The three measures of each window (means over its predictions), in window order; KL and top-1 empty without a
    # reference.
    window_nll: tuple[float, ...] = ()
    window_kl: tuple[float, ...] = ()
    window_top1: tuple[float, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("nan")

    # Standard errors of the three means over the windows (module docstring); None with fewer than two windows.
    @property
    def nll_se(self) -> float | None:
        return _standard_error(self.window_nll)

    @property
    def kl_se(self) -> float | None:
        return _standard_error(self.window_kl)

    @property
    def top1_se(self) -> float | None:
        return _standard_error(self.window_top1)

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second, "nll_se": self.nll_se,
                               "kl_se": self.kl_se, "top1_se": self.top1_se}


WINDOW_FIELDS = {"nll": "window_nll", "kl": "window_kl", "top1": "window_top1"}  # a measure → its per-window field


def _standard_error(values: tuple[float, ...]) -> float | None:
    """The standard error of the mean of `values` taken as independent samples; None with fewer than two."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def paired_difference(a: Evaluation, b: Evaluation, measure: str) -> tuple[float, float | None]:
    """`a`'s mean `measure` ("nll", "kl" or "top1") less `b`'s, evaluated on the same windows, and the standard error
    of that difference from the per-window differences (perplexities compare as exp of the NLL difference)."""
    first, second = getattr(a, WINDOW_FIELDS[measure]), getattr(b, WINDOW_FIELDS[measure])
    if len(first) != len(second) or (a.windows, a.seqlen) != (b.windows, b.seqlen):
        raise ValueError("A paired difference needs two evaluations on the same windows.")
    differences = tuple(x - y for x, y in zip(first, second, strict=True))
    return float(np.mean(differences)), _standard_error(differences)


def check_window(model: nn.Module, seqlen: int) -> None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"A window of {seqlen} tokens is longer than the model's context of {limit} tokens; "
                        f"use --seqlen {limit} or less.")


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at the first L−1 positions, in float32."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _home(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fits_on(model: nn.Module, device: torch.device) -> bool:
    """Whether the whole model may go to `device` for an evaluation (always, when its weights are already there)."""
    if device == _home(model) or device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return model_bytes(model) * DEVICE_HEADROOM <= free


@contextmanager
def _moved(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The model on `device` for the duration, then back where its weights were (a move, not a copy)."""
    home = _home(model)
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _whole_model(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                 weights: BlockWeights | None) -> Iterator[torch.Tensor]:
    n_blocks = architecture_of(model.config).n_blocks
    with ExitStack() as stack:
        for block in range(n_blocks if weights is not None else 0):
            stack.enter_context(weights.swapped(model, block))
        stack.enter_context(_moved(model, device))
        for first in range(0, windows.shape[0], batch_size):
            yield _log_softmax(model(windows[first:first + batch_size].to(device), use_cache=False).logits)


class _Replay(nn.Module):
    """Stands in for decoder block 0 in the head pass: returns the final hidden states of the current batch."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        if hasattr(original, "attention_type"):  # some models pick each block's mask by this attribute
            self.attention_type = original.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _PassThrough(nn.Module):
    """Stands in for decoder blocks 1… in the head pass."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _block_by_block(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                    weights: BlockWeights | None, progress: Progress) -> Iterator[torch.Tensor]:
    """The decoder blocks walked over all windows (activations on the host), then the rest of the model (embeddings,
    final norm, LM head) on the device with the blocks replaced by a replay of their final outputs: the model's own
    forward computes the logits, whatever its family puts after the blocks."""
    arch = architecture_of(model.config)
    walk = BlockWalk(model, arch, windows, device=device, batch_size=batch_size)
    hidden: list[torch.Tensor] = []
    for step in walk:
        with weights.swapped(model, step.index) if weights is not None else nullcontext():
            hidden = step.finish()  # computed with the swapped weights; the walk reuses these outputs
        progress(step.index + 1, arch.n_blocks + 1, f"block {step.index + 1}/{arch.n_blocks}")
    with replayed_blocks(model, arch.blocks_path, arch.n_blocks) as replay, _moved(model, device):
        # only the modules outside the blocks move now
        for first, hidden_batch in zip(walk.batch_starts, hidden):
            replay.hidden = hidden_batch.to(device)
            ids = windows[first:first + batch_size].to(device)
            yield _log_softmax(model(ids, use_cache=False).logits)


@contextmanager
def replayed_blocks(model: nn.Module, blocks_path: str, count: int) -> Iterator[_Replay]:
    """Decoder blocks 0 … count−1 (count ≥ 1) replaced for the duration: block 0 by a replay of the hidden states set
    on the yielded `_Replay` (what block count−1 would output), the others by pass-throughs. The model's own forward
    then runs only the blocks from `count` on and what follows them, with every argument it gives those blocks."""
    blocks = model.get_submodule(blocks_path)
    originals = list(blocks)[:count]
    replay = _Replay(originals[0])
    for index, block in enumerate(originals):
        blocks[index] = replay if index == 0 else _PassThrough(block)
    try:
        yield replay
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


def _log_prob_batches(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str | None,
                      blockwise: bool | None, weights: BlockWeights | None,
                      progress: Progress) -> Iterator[torch.Tensor]:
    """Log-probabilities of each batch of `batch_size` windows in turn, on the compute device."""
    device = torch.device(device) if device is not None else _home(model)
    if blockwise is None:
        blockwise = not fits_on(model, device)
    if blockwise:
        yield from _block_by_block(model, windows, batch_size, device, weights, progress)
    else:
        yield from _whole_model(model, windows, batch_size, device, weights)


REFERENCE_TOP_K = 128


@dataclass(frozen=True)
class ReferenceStats:
    """A reference model's top-k next-token log-probabilities on fixed windows (n × (L−1) × k, best first)."""

    log_probs: torch.Tensor
    token_ids: torch.Tensor
    mean_nll: float = math.nan  # the reference's own mean NLL on the windows (its perplexity is exp of it)

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_probs[first:first + size], self.token_ids[first:first + size]


@torch.inference_mode()
def reference_stats(model: nn.Module, windows: torch.Tensor, k: int = REFERENCE_TOP_K, batch_size: int = 1,
                    progress: Progress = no_progress, device: torch.device | str | None = None,
                    blockwise: bool | None = None) -> ReferenceStats:
    """`device` and `blockwise` (None: chosen by free device memory) as in `evaluate`."""
    check_window(model, windows.shape[1])
    values, ids = [], []
    nll_sum = 0.0
    batches = _log_prob_batches(model, windows, batch_size, device, blockwise, None, progress)
    for first, log_probs in zip(range(0, windows.shape[0], batch_size), batches):
        batch = windows[first:first + batch_size]
        nll_sum -= log_probs.gather(-1, batch[:, 1:].to(log_probs.device).unsqueeze(-1)).double().sum().item()
        top = log_probs.topk(k, dim=-1)
        values.append(top.values.cpu())
        ids.append(top.indices.to(torch.int32).cpu())
        progress(min(first + batch_size, windows.shape[0]), windows.shape[0], "reference")
    return ReferenceStats(torch.cat(values), torch.cat(ids), nll_sum / (windows.shape[0] * (windows.shape[1] - 1)))


def _kl_and_agreement(log_probs: torch.Tensor, reference: ReferenceStats | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window of the batch: summed KL(P_ref ‖ P_model) and the count of matching argmaxes, against full or top-k
    reference log-probs."""
    if isinstance(reference, torch.Tensor):  # full reference log-probabilities: exact
        kl = (reference.exp() * (reference - log_probs)).sum(-1)
        return kl.double().sum(-1), (reference.argmax(-1) == log_probs.argmax(-1)).sum(-1)
    ref_top, ref_ids = reference.log_probs, reference.token_ids.long()
    model_top = log_probs.gather(-1, ref_ids)
    p_top = ref_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    q_rest = (1 - model_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (ref_top - model_top)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
    return kl.double().sum(-1), (ref_ids[..., 0] == log_probs.argmax(-1)).sum(-1)


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | ReferenceStats | None = None,
             batch_size: int = 1, progress: Progress = no_progress, device: torch.device | str | None = None,
             blockwise: bool | None = None, weights: BlockWeights | None = None) -> Evaluation:
    """Perplexity of `model` on `windows` (n × seqlen); with a reference model or its `ReferenceStats` (computed on
    the same windows), also KL divergence and top-1 agreement. `device`: where the forward passes run (default: where
    the weights are); `blockwise`: walk block by block (None: when the model does not fit on the device); `weights`:
    swapped into each block while it runs (see the module docstring)."""
    check_window(model, windows.shape[1])
    start = time.perf_counter()
    nll_sums, kl_sums, agree_sums = [], [], []  # per window
    predicted = windows.shape[1] - 1  # next-token predictions per window
    firsts = range(0, windows.shape[0], batch_size)
    batches = _log_prob_batches(model, windows, batch_size, device, blockwise, weights, progress)
    reference_batches = (_log_prob_batches(reference, windows, batch_size, device, blockwise, None, no_progress)
                         if isinstance(reference, nn.Module) else iter(firsts))
    for first, log_probs, reference_log_probs in zip(firsts, batches, reference_batches):
        batch = windows[first:first + batch_size]
        targets = batch[:, 1:].to(log_probs.device)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if not torch.isfinite(nll).all():
            raise UserError("The model produced non-finite log-probabilities (NaN/inf); its weights are broken.")
        nll_sums += nll.double().sum(-1).tolist()
        if isinstance(reference, ReferenceStats):
            ref_top, ref_ids = reference.batch(first, batch_size)
            kl, agree = _kl_and_agreement(log_probs, ReferenceStats(ref_top.to(log_probs.device),
                                                                    ref_ids.to(log_probs.device)))
        elif reference is not None:
            kl, agree = _kl_and_agreement(log_probs, reference_log_probs.to(log_probs.device))
        if reference is not None:
            kl_sums += kl.tolist()
            agree_sums += agree.tolist()
        progress(min(first + batch_size, windows.shape[0]), windows.shape[0],
                 f"ppl {math.exp(sum(nll_sums) / (len(nll_sums) * predicted)):.3f}")
    window_nll, window_kl, window_top1 = (tuple(value / predicted for value in sums)
                                          for sums in (nll_sums, kl_sums, agree_sums))
    mean_nll = float(np.mean(window_nll))
    return Evaluation(math.exp(mean_nll), mean_nll, windows.shape[0] * predicted, windows.shape[0],
                      windows.shape[1], time.perf_counter() - start,
                      float(np.mean(window_kl)) if reference is not None else None,
                      float(np.mean(window_top1)) if reference is not None else None,
                      window_nll, window_kl, window_top1)
