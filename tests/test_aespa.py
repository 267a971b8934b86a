"""aespa's quantizer (aptq/aespa.py): the closed-form objective against autograd, the optimised loss against its
start, the grid of the result, and the quantizer end to end on a tiny llama (mixed widths, progress, cancel)."""

from __future__ import annotations

import json

import pytest
import torch

import aptq.aespa as aespa
import aptq.pipeline as pipeline
from aptq.aespa import AespaOptions, AttentionObjective, _gradients, _Relaxation, optimise_rounding, out_row_factor
from aptq.cli import main
from aptq.data import Sampling
from aptq.errors import UserError
from aptq.gptq import gptq, gptq_per_head, gptq_rows
from aptq.history import stored_runs
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan
from aptq.progress import Cancelled
from aptq.quantizer import QuantConfig, recover_codes, rtn
from aptq.store import Store

D_IN, HEAD_DIM, N_HEADS, N_KV = 32, 4, 4, 2
TOKENS = 96


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


def _inputs(seed: int) -> torch.Tensor:
    """Correlated inputs X (d_in × N), as layer inputs are: a shared component plus noise."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D_IN, D_IN, generator=generator) / D_IN ** 0.5 + torch.eye(D_IN)
    return mixing @ torch.randn(D_IN, TOKENS, generator=generator, dtype=torch.float64).float()


def _hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[1] * X @ X.T


def _tiny_layers(seed: int = 0) -> dict[str, tuple[torch.Tensor, AttentionObjective, torch.Tensor]]:
    """Per kind, a weight, its objective and its attention-aware GPTQ start at 2 bits in groups of 16:
    plain (o/MLP), rows (q: G per head) and value (H_V per KV head with the out projection's row factor)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(2, 16)
    X = _inputs(seed)
    H = _hessian(X)
    keys = torch.randn(N_HEADS, 24, HEAD_DIM, generator=generator)
    G = keys.transpose(1, 2) @ keys / 24
    W_plain = torch.randn(24, D_IN, generator=generator)
    W_rows = torch.randn(N_HEADS * HEAD_DIM, D_IN, generator=generator)
    W_value = torch.randn(N_KV * HEAD_DIM, D_IN, generator=generator)
    attention = torch.softmax(torch.randn(N_KV, TOKENS, TOKENS, generator=generator), dim=-1)
    H_V = torch.stack([_hessian(X @ attention[g].T) for g in range(N_KV)])
    W_O = torch.randn(16, N_HEADS * HEAD_DIM, generator=generator)
    return {
        "plain": (W_plain, AttentionObjective(H.unsqueeze(0)), gptq(W_plain, H, cfg).weight),
        "rows": (W_rows, AttentionObjective(H.unsqueeze(0), G), gptq_rows(W_rows, H, G, cfg).weight),
        "value": (W_value, AttentionObjective(H_V, out_row_factor(W_O, N_KV, HEAD_DIM)),
                  gptq_per_head(W_value, H_V, cfg).weight),
    }


def test_closed_form_loss_and_gradient_match_autograd_of_the_attention_output_difference():
    """The value path: query head h of KV group g adds `W_O,h ΔW_g X A_gᵀ` to the attention output. The explicit
    objective (2/N) Σ_h ‖W_O,h ΔW_g(h) X A_gᵀ‖² (heads taken one by one, as aespa does) differentiated by autograd
    equals the closed form `tr(G_O ΔW H_V ΔWᵀ)` and its gradient `2 G_O ΔW H_V`, with the GQA sum of out slices."""
    generator = torch.Generator().manual_seed(1)
    X = _inputs(1).double()
    attention = torch.softmax(torch.randn(N_KV, TOKENS, TOKENS, generator=generator, dtype=torch.float64), dim=-1)
    W_O = torch.randn(16, N_HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    delta = torch.randn(N_KV * HEAD_DIM, D_IN, generator=generator, dtype=torch.float64, requires_grad=True)
    repeats = N_HEADS // N_KV
    explicit = sum(
        (W_O[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] @ delta[g * HEAD_DIM:(g + 1) * HEAD_DIM] @ X @ attention[g].T)
        .square().sum() * 2 / TOKENS
        for h in range(N_HEADS) for g in [h // repeats])
    (expected_gradient,) = torch.autograd.grad(explicit, delta)
    H_V = torch.stack([2 / TOKENS * X @ attention[g].T @ attention[g] @ X.T for g in range(N_KV)])
    objective = AttentionObjective(H_V, out_row_factor(W_O, N_KV, HEAD_DIM).double())
    loss, gradient = objective.loss_and_gradient(delta.detach())
    assert float(loss) == pytest.approx(explicit.item(), rel=1e-10)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-12)


def test_closed_form_gradient_matches_autograd_of_the_query_key_objective():
    """q/k: `tr(G ΔW H ΔWᵀ)` with G_h = K_hᵀK_h/m per head equals (2/N) Σ_h ‖K_h ΔW_h X‖²/m; gradients agree."""
    generator = torch.Generator().manual_seed(2)
    X = _inputs(2).double()
    keys = torch.randn(N_HEADS, 10, HEAD_DIM, generator=generator, dtype=torch.float64)
    delta = torch.randn(N_HEADS * HEAD_DIM, D_IN, generator=generator, dtype=torch.float64, requires_grad=True)
    explicit = sum((keys[h] @ delta[h * HEAD_DIM:(h + 1) * HEAD_DIM] @ X).square().sum() * 2 / (TOKENS * 10)
                   for h in range(N_HEADS))
    (expected_gradient,) = torch.autograd.grad(explicit, delta)
    objective = AttentionObjective(_hessian(X).unsqueeze(0), keys.transpose(1, 2) @ keys / 10)
    loss, gradient = objective.loss_and_gradient(delta.detach())
    assert float(loss) == pytest.approx(explicit.item(), rel=1e-10)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("group", [16, 12])  # 12: the last group of 8 columns, padded in the optimiser's layout
@pytest.mark.parametrize("learn_scales", [False, True])
def test_the_written_out_chain_rule_matches_autograd_of_the_relaxed_loss(learn_scales, group):
    """The optimiser's gradients (V and the scales' log-factors) against autograd through the relaxation
    `s · (clamp(base + h(V), 0, M) − z)` and the regulariser, away from the starting point."""
    W, objective, start = _tiny_layers()["rows"]
    cfg = QuantConfig(2, group)
    start = start if group == 16 else rtn(W, cfg)
    relaxed = _Relaxation.of(W, start, cfg)
    generator = torch.Generator().manual_seed(3)
    V = relaxed.initial_variables() + 0.5 * torch.randn(relaxed.fixed.shape, generator=generator)
    log_factor = 0.05 * torch.randn(relaxed.group_scale.shape[:2], generator=generator)
    options = AespaOptions(learn_scales=learn_scales)
    start_loss = objective.loss(W, start)
    d_V, d_log = _gradients(V, log_factor, relaxed, relaxed.grouped(W), objective, start_loss, 7.0, options)
    V, log_factor = V.requires_grad_(), log_factor.requires_grad_()
    h = torch.clamp(torch.sigmoid(V) * 1.2 - 0.1, 0, 1)
    loss, _ = objective.loss_and_gradient(relaxed.flat(relaxed.scales(log_factor) * relaxed.levels(h)) - W)
    total = loss / start_loss + options.regulariser * (1 - relaxed.flat(2 * h - 1).abs().pow(7.0)).mean()
    total.backward()
    torch.testing.assert_close(relaxed.flat(d_V), relaxed.flat(V.grad), rtol=1e-4, atol=1e-9)
    if learn_scales:
        torch.testing.assert_close(d_log, log_factor.grad, rtol=1e-4, atol=1e-9)
    else:
        assert d_log is None


@pytest.mark.parametrize("kind", ["plain", "rows", "value"])
def test_optimised_rounding_lowers_the_attention_aware_gptq_loss(kind):
    W, objective, start = _tiny_layers()[kind]
    result = optimise_rounding(W, start, objective, QuantConfig(2, 16), AespaOptions(iterations=300))
    assert result.start_loss == pytest.approx(objective.loss(W, start))
    assert not result.kept_start and result.loss < result.start_loss
    assert result.loss == pytest.approx(objective.loss(W, result.weight))


def test_optimised_rounding_from_round_to_nearest_lowers_its_loss():
    W, objective, _ = _tiny_layers()["rows"]
    cfg = QuantConfig(2, 16)
    start = rtn(W, cfg)
    result = optimise_rounding(W, start, objective, cfg, AespaOptions(iterations=300))
    assert result.loss < 0.9 * objective.loss(W, start)


def test_the_relaxation_starts_exactly_at_the_start():
    """With a zero learning rate the hard-rounded variables are the start's codes, also where GPTQ moved a code
    more than one step from the weight's nearest level."""
    W, objective, start = _tiny_layers()["rows"]
    cfg = QuantConfig(2, 16)
    grid = recover_codes(start, cfg)
    nearest = torch.clamp(torch.round(W / grid.scales.float()[:, grid.group_index().long()]
                                      + grid.zeros.float()[:, grid.group_index().long()]), 0, cfg.max_level)
    assert ((grid.codes.float() - nearest).abs() > 0).any()  # GPTQ did not simply round to nearest
    result = optimise_rounding(W, start, objective, cfg, AespaOptions(iterations=3, learning_rate=0.0))
    assert torch.equal(result.weight, start)


@pytest.mark.parametrize("group", [16, 12])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("learn_scales", [False, True])
def test_the_result_lies_on_a_grid_with_float16_scales(symmetric, learn_scales, group):
    W, objective, _ = _tiny_layers()["value"]
    cfg = QuantConfig(3, group, symmetric=symmetric)
    start = rtn(W, cfg)
    result = optimise_rounding(W, start, objective, cfg, AespaOptions(iterations=50, learn_scales=learn_scales))
    codes = recover_codes(result.weight, cfg)
    assert torch.equal(codes.dequantize(), result.weight)
    if symmetric:
        assert (codes.zeros == cfg.symmetric_zero).all()


def test_the_cpu_setting_takes_fewer_iterations_from_three_bits():
    """The default options run CPU_ITERATIONS below 3 bits and CPU_WIDE_ITERATIONS from 3, exactly as those explicit
    counts do; a GPU takes GPU_ITERATIONS at every width, and an explicit count holds at every width."""
    W, objective, _ = _tiny_layers()["rows"]
    for bits, count in ((2, aespa.CPU_ITERATIONS), (3, aespa.CPU_WIDE_ITERATIONS), (4, aespa.CPU_WIDE_ITERATIONS)):
        cfg = QuantConfig(bits, 16)
        start = rtn(W, cfg)
        by_width = optimise_rounding(W, start, objective, cfg, AespaOptions()).weight
        assert torch.equal(by_width, optimise_rounding(W, start, objective, cfg, AespaOptions(iterations=count)).weight)
    other = optimise_rounding(W, start, objective, cfg, AespaOptions(iterations=aespa.CPU_ITERATIONS)).weight
    assert not torch.equal(by_width, other)  # the two counts differ here, so the rule is seen
    assert AespaOptions.for_device("cpu") == AespaOptions()
    assert AespaOptions.for_device("cuda").iterations_for(2) == aespa.GPU_ITERATIONS
    assert AespaOptions.for_device("cpu", 7).iterations_for(4) == AespaOptions(iterations=7).iterations_for(2) == 7


def test_bad_options_are_refused_in_one_sentence():
    with pytest.raises(UserError, match="iterations"):
        AespaOptions(iterations=-1)
    with pytest.raises(UserError, match="start"):
        AespaOptions(start="gptq")


def test_the_other_methods_keep_their_run_keys():
    """aespa's options enter only aespa's run key, so runs stored before by the other methods are still found."""
    common = {"method", "group_size", "symmetric", "act_order", "clip_search", "damp"}
    assert set(QuantizeSettings("rtn").key_fields()) == common
    assert set(QuantizeSettings("gptq").key_fields()) == common | {"fp_targets"}  # on by default since 2026-12-02
    assert set(QuantizeSettings("gptq", fp_targets=0).key_fields()) == common
    assert set(QuantizeSettings("attention").key_fields()) == common | {"row_weights", "fp_targets"}
    assert QuantizeSettings("aespa").key_fields()["aespa"]["iterations"] == AespaOptions().iterations
    assert QuantizeSettings("aespa").key_fields()["aespa"]["learn_scales"] is True  # the default chosen on validation


def test_aespa_on_a_tiny_llama_with_mixed_widths_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    loaded = load_model(str(model), device="cpu")
    plan = {layer.name: (2 if layer.kind in ("gate", "up", "down") else 4) for layer in loaded.arch.layers}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"This is sentence {i} of a small test corpus." for i in range(400)))
    code = main(["quantize", "--model", str(model), "--corpus", str(text), "--device", "cpu",
                 "--store", str(tmp_path / "store.duckdb"), "--method", "aespa", "--plan", str(plan_path),
                 "--group", "32", "--samples", "6", "--seqlen", "32", "--eval-seqlen", "32", "--tokens", "256",
                 "--aespa-iterations", "20", "--aespa-fixed-scales", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "aespa" and 2 < row["avg_bits"] < 4 and row["perplexity"] > 1
    assert json.loads(row["settings"])["aespa"]["iterations"] == 20
    assert json.loads(row["settings"])["aespa"]["learn_scales"] is False


def test_aespa_reports_progress_and_cancels_like_the_other_quantizers(tiny_model_dir, text_corpus, tmp_path):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    store = Store(tmp_path / "store.duckdb")
    plan = pipeline.uniform_plan(loaded.arch, 3)
    settings = QuantizeSettings("aespa", 32, aespa=AespaOptions(iterations=20))
    sampling, evaluation = Sampling(6, 32, seed=0), EvalSettings(seqlen=32, max_tokens=256)
    seen = []

    def cancel_after_first_block(done: int, total: int, message: str) -> None:
        seen.append(message)
        if message.startswith("quantizing") and done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_plan(loaded, text_corpus, sampling, plan, settings, evaluation, store, cancel_after_first_block)
    assert "quantizing: block 1/2" in seen and stored_runs(store).empty
    row = run_plan(loaded, text_corpus, sampling, plan, settings, evaluation, store)
    assert row.method == "aespa" and not row.cached
    gptq_identity = pipeline.identify_run(loaded, text_corpus, sampling, plan, QuantizeSettings("attention", 32),
                                          evaluation)
    assert gptq_identity.key != row.key
