import copy
import math

import numpy as np
import pytest
import torch

from aptq.errors import UserError
from aptq.evaluate import evaluate, paired_difference, reference_stats
from aptq.models import load_model
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save_tiny_model("llama", tmp_path_factory.mktemp("llama"))), device="cpu").model


def test_perplexity_is_exp_of_the_mean_nll_by_hand(tiny_llama):
    windows = torch.randint(0, 49152, (3, 17), generator=torch.Generator().manual_seed(0))
    result = evaluate(tiny_llama, windows, batch_size=2)
    with torch.no_grad():
        logits = tiny_llama(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens == 3 * 16 and result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_kl_of_a_model_against_itself_is_zero(tiny_llama):
    windows = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))
    result = evaluate(tiny_llama, windows, reference=tiny_llama)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-6) and result.top1_agreement == 1.0


def test_kl_against_a_different_model_is_positive(tiny_llama, tmp_path):
    other = load_model(str(save_tiny_model("llama", tmp_path, seed=1)), device="cpu").model
    windows = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))
    assert evaluate(tiny_llama, windows, reference=other).kl_divergence > 0


def test_window_longer_than_the_context_is_refused(tiny_llama):
    with pytest.raises(UserError, match="longer than the model's context of 256 tokens"):
        evaluate(tiny_llama, torch.zeros(1, 300, dtype=torch.long))


def brute_force_kl(model, reference, windows: torch.Tensor) -> tuple[float, float]:
    """KL(P_reference ‖ P_model) and top-1 agreement from float64 copies of both models, summed over the whole
    vocabulary position by position with numpy: an implementation independent of aptq.evaluate."""
    def probabilities(network) -> np.ndarray:
        with torch.no_grad():
            logits = copy.deepcopy(network).double()(windows).logits[:, :-1].numpy()
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        return shifted / shifted.sum(-1, keepdims=True)

    p, q = probabilities(reference), probabilities(model)
    terms = [float(np.sum(p_pos * (np.log(p_pos) - np.log(q_pos))))
             for p_pos, q_pos in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]), strict=True)]
    return float(np.mean(terms)), float(np.mean(p.argmax(-1) == q.argmax(-1)))


def test_top_k_reference_stats_bound_the_exact_kl(tiny_llama, tmp_path):
    other = load_model(str(save_tiny_model("llama", tmp_path, seed=2)), device="cpu").model
    windows = torch.randint(0, 49152, (3, 9), generator=torch.Generator().manual_seed(3))
    kl, top1 = brute_force_kl(other, tiny_llama, windows)
    exact = evaluate(other, windows, reference=tiny_llama)
    full = evaluate(other, windows, reference=reference_stats(tiny_llama, windows, k=49152))
    top = evaluate(other, windows, reference=reference_stats(tiny_llama, windows, k=128))
    assert exact.kl_divergence == pytest.approx(kl, rel=1e-4) and exact.top1_agreement == top1
    assert full.kl_divergence == pytest.approx(kl, rel=1e-4)
    assert full.top1_agreement == top.top1_agreement == top1
    assert 0 < top.kl_divergence <= kl * (1 + 1e-4)
    assert evaluate(tiny_llama, windows, reference=reference_stats(tiny_llama, windows)).kl_divergence == \
        pytest.approx(0.0, abs=1e-6)


def test_standard_errors_are_those_of_the_window_means(tiny_llama, tmp_path):
    other = load_model(str(save_tiny_model("llama", tmp_path, seed=3)), device="cpu").model
    windows = torch.randint(0, 49152, (4, 9), generator=torch.Generator().manual_seed(4))
    together = evaluate(other, windows, reference=tiny_llama, batch_size=3)  # batches of 3 and 1 windows
    alone = [evaluate(other, windows[i:i + 1], reference=tiny_llama) for i in range(4)]
    for se, values in ((together.nll_se, [a.mean_nll for a in alone]),
                       (together.kl_se, [a.kl_divergence for a in alone]),
                       (together.top1_se, [a.top1_agreement for a in alone])):
        assert se == pytest.approx(np.std(values, ddof=1) / 2, rel=1e-6) and se > 0
    assert together.window_kl == pytest.approx([a.kl_divergence for a in alone], rel=1e-9)
    assert together.kl_divergence == pytest.approx(np.mean([a.kl_divergence for a in alone]), rel=1e-9)
    assert alone[0].kl_se is None and alone[0].nll_se is None  # one window: no spread to measure


def test_a_paired_difference_is_the_mean_and_standard_error_of_the_window_differences(tiny_llama, tmp_path):
    first, second = (load_model(str(save_tiny_model("llama", tmp_path / str(seed), seed=seed)), device="cpu").model
                     for seed in (5, 6))
    windows = torch.randint(0, 49152, (5, 9), generator=torch.Generator().manual_seed(7))
    a, b = (evaluate(model, windows, reference=tiny_llama) for model in (first, second))
    for measure, per_window in (("nll", "window_nll"), ("kl", "window_kl"), ("top1", "window_top1")):
        differences = np.subtract(getattr(a, per_window), getattr(b, per_window))
        mean, se = paired_difference(a, b, measure)
        assert mean == pytest.approx(differences.mean(), abs=1e-12)
        assert se == pytest.approx(differences.std(ddof=1) / np.sqrt(5), rel=1e-9)
    assert paired_difference(a, b, "nll")[0] == pytest.approx(a.mean_nll - b.mean_nll, abs=1e-12)
    with pytest.raises(ValueError, match="same windows"):
        paired_difference(a, evaluate(first, windows[:3], reference=tiny_llama), "kl")
