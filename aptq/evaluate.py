"""Perplexity, KL divergence and top-1 agreement of next-token distributions.

Perplexity follows the GPTQ protocol: non-overlapping windows of `seqlen` tokens, each evaluated independently; it
is exp of the mean negative log-likelihood over every predicted token (the L−1 next-token predictions per window).
KL divergence KL(P_reference ‖ P_model) and top-1 agreement are averaged over the same predicted positions.

Comparing many quantized models with one reference would recompute the reference's logits every time, so the
reference can be summarized once as `ReferenceStats`: its top-k log-probabilities per position (our choice, k = 128).
KL against those stats treats the tokens outside the reference's top k as one bucket; by the log-sum inequality that
is a lower bound of the exact KL, and with k = vocabulary size it is exact (see tests/test_evaluate.py and
bench/results for the measured gap).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from aptq.errors import UserError
from aptq.progress import Progress, no_progress


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

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def check_window(model: nn.Module, seqlen: int) -> None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"A window of {seqlen} tokens is longer than the model's context of {limit} tokens; "
                        f"use --seqlen {limit} or less.")


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at the first L−1 positions, in float32."""
    device = next(model.parameters()).device
    logits = model(batch.to(device), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


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
                    progress: Progress = no_progress) -> ReferenceStats:
    check_window(model, windows.shape[1])
    values, ids = [], []
    nll_sum = 0.0
    for first in range(0, windows.shape[0], batch_size):
        batch = windows[first:first + batch_size]
        log_probs = _log_probs(model, batch)
        nll_sum -= log_probs.gather(-1, batch[:, 1:].to(log_probs.device).unsqueeze(-1)).double().sum().item()
        top = log_probs.topk(k, dim=-1)
        values.append(top.values.cpu())
        ids.append(top.indices.to(torch.int32).cpu())
        progress(min(first + batch_size, windows.shape[0]), windows.shape[0], "reference")
    return ReferenceStats(torch.cat(values), torch.cat(ids), nll_sum / (windows.shape[0] * (windows.shape[1] - 1)))


def _kl_and_agreement(log_probs: torch.Tensor, reference: ReferenceStats | torch.Tensor) -> tuple[float, int]:
    """Summed KL(P_ref ‖ P_model) and the count of matching argmaxes, against full or top-k reference log-probs."""
    if isinstance(reference, torch.Tensor):  # full reference log-probabilities: exact
        kl = (reference.exp() * (reference - log_probs)).sum(-1)
        return kl.double().sum().item(), (reference.argmax(-1) == log_probs.argmax(-1)).sum().item()
    ref_top, ref_ids = reference.log_probs, reference.token_ids.long()
    model_top = log_probs.gather(-1, ref_ids)
    p_top = ref_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    q_rest = (1 - model_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (ref_top - model_top)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
    return kl.double().sum().item(), (ref_ids[..., 0] == log_probs.argmax(-1)).sum().item()


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | ReferenceStats | None = None,
             batch_size: int = 1, progress: Progress = no_progress) -> Evaluation:
    """Perplexity of `model` on `windows` (n × seqlen); with a reference model or its `ReferenceStats` (computed on
    the same windows), also KL divergence and top-1 agreement."""
    check_window(model, windows.shape[1])
    start = time.perf_counter()
    nll_sum, kl_sum, agree_sum, count = 0.0, 0.0, 0, 0
    for first in range(0, windows.shape[0], batch_size):
        batch = windows[first:first + batch_size]
        log_probs = _log_probs(model, batch)
        targets = batch[:, 1:].to(log_probs.device)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if not torch.isfinite(nll).all():
            raise UserError("The model produced non-finite log-probabilities (NaN/inf); its weights are broken.")
        nll_sum += nll.double().sum().item()
        count += targets.numel()
        if isinstance(reference, ReferenceStats):
            ref_top, ref_ids = reference.batch(first, batch_size)
            kl, agree = _kl_and_agreement(log_probs, ReferenceStats(ref_top.to(log_probs.device),
                                                                    ref_ids.to(log_probs.device)))
        elif reference is not None:
            kl, agree = _kl_and_agreement(log_probs, _log_probs(reference, batch).to(log_probs.device))
        if reference is not None:
            kl_sum += kl
            agree_sum += agree
        progress(min(first + batch_size, windows.shape[0]), windows.shape[0], f"ppl {math.exp(nll_sum / count):.3f}")
    mean_nll = nll_sum / count
    return Evaluation(math.exp(mean_nll), mean_nll, count, windows.shape[0], windows.shape[1],
                      time.perf_counter() - start,
                      kl_sum / count if reference is not None else None,
                      agree_sum / count if reference is not None else None)
