"""Perplexity, KL divergence and top-1 agreement of next-token distributions.

Perplexity follows the GPTQ protocol: non-overlapping windows of `seqlen` tokens, each evaluated independently; it
is exp of the mean negative log-likelihood over every predicted token (the L−1 next-token predictions per window).
KL divergence KL(P_reference ‖ P_model) and top-1 agreement are averaged over the same predicted positions.
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


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None, batch_size: int = 1,
             progress: Progress = no_progress) -> Evaluation:
    """Perplexity of `model` on `windows` (n × seqlen); with a `reference`, also KL and top-1 agreement."""
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
        if reference is not None:
            ref_log_probs = _log_probs(reference, batch).to(log_probs.device)
            kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
            kl_sum += kl.double().sum().item()
            agree_sum += (ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum().item()
        progress(min(first + batch_size, windows.shape[0]), windows.shape[0], f"ppl {math.exp(nll_sum / count):.3f}")
    mean_nll = nll_sum / count
    return Evaluation(math.exp(mean_nll), mean_nll, count, windows.shape[0], windows.shape[1],
                      time.perf_counter() - start,
                      kl_sum / count if reference is not None else None,
                      agree_sum / count if reference is not None else None)
