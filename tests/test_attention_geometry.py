"""The value and row Hessians of every family against the autograd Jacobian of that family's own attention module.

The quantities checked (docs/families.md):

- `H_V,g`: `I_{d_h} ⊗ H_V,g = (2 / (N r)) Σ_seg J_Wᵀ J_W`, J_W the Jacobian of the heads' outputs of group g (the input
  of the out projection) w.r.t. the value weight rows of g, r = query heads per KV head;
- `G_Q,h = (d_h / S) Σ_seg Σ_p Σ_j ω_pj (∂s_pj/∂y_p,h)(∂s_pj/∂y_p,h)ᵀ`, with s the scores the attention function sees
  (after scaling and soft-cap, before the mask), y the q projection's output and ω_pj = 1/(L · #keys seen by p);
  `G_K,g` the same with ∂s_pj/∂y_j,g of the key projection, averaged over the r query heads of g.

The brute force perturbs the projection's output inside the real module's forward (its norm, rotary embedding and
scaling included), reads the scores from an eager attention function of this test, and differentiates. The collector
runs on a block walk with a small local adapter (tiny llama-like module names), so the math is checked independently
of aptq.models' family table.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AutoModelForCausalLM

from aptq.capture import BlockWalk
from aptq.errors import UserError
from aptq.geometry import NormJacobian, RotaryLayout, complex_to_real, geometry_for, rotary_layout, sandwiched_sum
from aptq.hessian import CollectOptions, HessianCollector, recording_attention
from aptq.models import Architecture, LinearLayer, Rows, architecture_of
from tests.tiny_models import WINDOW, tiny_config

N_SEGMENTS, LENGTH = 2, 20  # longer than the sliding window of the tiny configs
SCORES = "aptq_test_scores"
ATTENTION_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo2",
                      "stablelm", "starcoder2", "granite", "cohere", "mixtral", "qwen3_moe", "opt", "gpt2", "mqa",
                      "gemma2_tight_cap", "falcon", "falcon_gqa", "falcon_mha"]
# Variants of a stock config: one KV head for all query heads; a soft-cap small enough that the tiny model's scores
# (|s| < 0.1) reach its curved part (at 50 its slope is 1 − 1e-6); Falcon's other two fused layouts besides the stock
# multi-query one: the new decoder architecture (GQA, per-KV-head [q heads | k | v]) and per-head [q | k | v] (MHA).
VARIANTS = {"mqa": ("llama", dict(num_key_value_heads=1)),
            "gemma2_tight_cap": ("gemma2", dict(attn_logit_softcapping=0.05)),
            "falcon_gqa": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
            "falcon_mha": ("falcon", dict(multi_query=False))}
INLINE_ATTENTION = {"falcon"}  # families computing attention inline: the probe reads the softmax's input
assert WINDOW < LENGTH


# ---------------------------------------------------------------------------------------------------------------
# Models and a local adapter


def build(family: str, **overrides) -> torch.nn.Module:
    family, variant = VARIANTS.get(family, (family, {}))
    config = tiny_config(family)
    for name, value in (variant | overrides).items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make their gains matter
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model


def local_architecture(model: torch.nn.Module) -> Architecture:
    """q/k/v/o of each block for modules named like Llama's (Phi-3's fused qkv_proj as row slices [q | k | v])."""
    config = model.config
    if config.model_type in ("opt", "gpt2", "falcon"):
        return architecture_of(config)
    attention = model.model.layers[0].self_attn
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d = attention.head_dim
    layers = []
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn"
        if hasattr(attention, "qkv_proj"):
            bounds = [0, n_heads * d, (n_heads + n_kv) * d, (n_heads + 2 * n_kv) * d]
            layers += [LinearLayer(f"{prefix}.qkv_proj.{kind}", i, kind, f"{prefix}.qkv_proj",
                                   rows=Rows(bounds[j], bounds[j + 1] - bounds[j]), fused=f"{prefix}.qkv_proj")
                       for j, kind in enumerate("qkv")]
        else:
            layers += [LinearLayer(f"{prefix}.{kind}_proj", i, kind, f"{prefix}.{kind}_proj") for kind in "qkv"]
        out = "o_proj" if hasattr(attention, "o_proj") else "dense"
        layers.append(LinearLayer(f"{prefix}.{out}", i, "o", f"{prefix}.{out}"))
    return Architecture(config.model_type, config.num_hidden_layers, config.hidden_size, n_heads, n_kv, d, True,
                        "model.layers", "self_attn", None, tuple(layers))


def segments() -> torch.Tensor:
    return torch.randint(0, 5000, (N_SEGMENTS, LENGTH), generator=torch.Generator().manual_seed(1))


def collect(model, arch, ids, block: int = 0, row_weights: str = "uniform"):
    options = CollectOptions(probes=0, row_weights=row_weights)
    for step in BlockWalk(model, arch, ids, batch_size=2, stop=block + 1):
        if step.index == block:
            with HessianCollector(step, arch, options) as collector:
                for batch in step.batches():
                    step.keep_output(batch, collector.process(batch))
            return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# Brute force through the family's own attention module


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Eager attention that hands its scores (scaled, soft-capped, before the mask) to `module._test_scores`."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    repeats = query.shape[1] // key.shape[1]
    scores = query @ key.repeat_interleave(repeats, 1).transpose(2, 3) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    module._test_scores(scores)
    probs = torch.softmax(scores + attention_mask, dim=-1)
    return (probs @ value.repeat_interleave(repeats, 1)).transpose(1, 2).contiguous(), probs


AttentionInterface.register(SCORES, _scoring_attention)


class SoftmaxInput(TorchFunctionMode):
    """Hands the input of every softmax to `found(scores)`: for an attention computed inline (Falcon) that input is
    the scaled scores plus the mask (0 on visible pairs, so its derivative is the scores')."""

    def __init__(self, found) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.softmax:
            self.found(args[0])
        return func(*args, **(kwargs or {}))


class AttentionProbe:
    """One block's attention module called on one segment with the block's real arguments, a perturbation δ added to
    one projection's output, returning the scores and the heads' outputs (the out projection's input)."""

    def __init__(self, model, arch, ids, block: int = 0):
        self.arch = arch
        self.attention = model.get_submodule(f"{arch.blocks_path}.{block}.{arch.attention_attr}")
        self.layers = {layer.kind: layer for layer in arch.block_layers(block)}
        seen = {}
        handles = [self.attention.register_forward_pre_hook(lambda m, a, k: seen.update(call=(a, k)),
                                                            with_kwargs=True),
                   self.attention.register_forward_hook(lambda m, a, out: seen.update(probs=out[1].detach()))]
        for kind, layer in self.layers.items():
            handles.append(model.get_submodule(layer.module_path).register_forward_pre_hook(
                lambda m, a, kind=kind: seen.update({kind: a[0].detach()})))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        self.args, self.kwargs = seen["call"]
        self.probs = seen["probs"]  # the eager path's, to check the test's own attention function
        self.inputs = {kind: seen[kind] for kind in "vo"}
        mask = self.kwargs.get("attention_mask", self.args[1] if len(self.args) > 1 else None)
        self.visible = mask[0, 0] > torch.finfo(mask.dtype).min / 2
        self._jacobians: dict[tuple[int, str, int], torch.Tensor] = {}

    def run(self, segment: int, kind: str, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (H, L, L), head outputs (L, H·d)) of `segment` with δ added to the rows of `kind`'s output."""
        layer = self.layers[kind]
        found = {}

        def add(module, args, output):
            rows = layer.rows or Rows(0, output.shape[-1])  # interleaved rows too (Falcon's fused layouts)
            return output.index_add(-1, rows.index(output.device), delta.reshape(*output.shape[:-1], -1))

        projection = self.attention.get_submodule(layer.module_path.split(f"{self.arch.attention_attr}.")[-1])
        out = self.attention.get_submodule(self.layers["o"].module_path.split(f"{self.arch.attention_attr}.")[-1])
        handles = [projection.register_forward_hook(add),
                   out.register_forward_pre_hook(lambda m, a: found.update(heads=a[0]))]
        self.attention._test_scores = lambda scores: found.update(scores=scores)
        config = self.attention.config
        previous, config._attn_implementation = config._attn_implementation, SCORES
        try:
            one = {k: (v[segment:segment + 1] if isinstance(v, torch.Tensor) and v.shape[0] == N_SEGMENTS else v)
                   for k, v in self.kwargs.items()}
            args = [a[segment:segment + 1] if isinstance(a, torch.Tensor) and a.shape[0] == N_SEGMENTS else a
                    for a in self.args]
            if self.arch.family in INLINE_ATTENTION:  # the module's own inline forward, untouched
                with SoftmaxInput(lambda scores: found.update(scores=scores)):
                    self.attention(*args, **one)
            else:
                self.attention(*args, **one)
        finally:
            config._attn_implementation = previous
            for handle in handles:
                handle.remove()
        return found["scores"][0], found["heads"][0].reshape(LENGTH, -1)

    def width(self, kind: str) -> int:
        rows = self.layers[kind].rows
        heads = self.arch.n_heads if kind == "q" else self.arch.n_kv_heads
        return heads * self.arch.head_dim if rows is None else len(rows)

    def jacobian(self, segment: int, kind: str, output: int) -> torch.Tensor:
        if (segment, kind, output) not in self._jacobians:
            zero = torch.zeros(LENGTH, self.width(kind))
            self._jacobians[segment, kind, output] = torch.autograd.functional.jacobian(
                lambda delta: self.run(segment, kind, delta)[output], zero, vectorize=True).double()
        return self._jacobians[segment, kind, output]

    def exact_row_hessians(self, kind: str, weights: str = "uniform") -> torch.Tensor:
        """G_Q per query head or G_K per KV head, from ∂s_pj/∂y (see the module docstring); with `weights`
        "attention", of each query's centred, probability-weighted score changes (aptq.geometry
        .attention_weighted_rows): for q `Σ_p g_pᵀ (diag(A_p) − A_p A_pᵀ) g_p / L`, for k each key's own block
        `Σ_p A_pj (1 − A_pj) g_pj g_pjᵀ / L`."""
        arch, d = self.arch, self.arch.head_dim
        repeats = arch.n_heads // arch.n_kv_heads
        omega = self.visible.double() / (self.visible.sum(1, keepdim=True) * LENGTH)
        count = arch.n_heads if kind == "q" else arch.n_kv_heads
        total = torch.zeros(count, d, d, dtype=torch.float64)
        for s in range(N_SEGMENTS):
            jac = self.jacobian(s, kind, 0)  # (H, L_p, L_j, L_t, width): ∂s_pj / ∂y_t
            for h in range(arch.n_heads):
                target = h if kind == "q" else h // repeats
                block = jac[h, ..., target * d:(target + 1) * d]
                if kind == "q":  # the query at p moves s_pj
                    grads = torch.diagonal(block, dim1=0, dim2=2).permute(2, 0, 1)  # (p, j, d)
                else:  # the key at j moves s_pj
                    grads = torch.diagonal(block, dim1=1, dim2=2).permute(0, 2, 1)
                if weights == "uniform":
                    total[target] += torch.einsum("pj,pja,pjb->ab", omega, grads, grads)
                    continue
                probs = self.probs[s, h].double()
                if kind == "q":
                    centred = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
                    total[target] += torch.einsum("pij,pia,pjb->ab", centred, grads, grads) / LENGTH
                else:
                    total[target] += torch.einsum("pj,pja,pjb->ab", probs - probs.square(), grads, grads) / LENGTH
        return total * d / (N_SEGMENTS * (1 if kind == "q" else repeats))

    def exact_value_hessians(self) -> torch.Tensor:
        """I_{d_h} ⊗ H_V,g from the Jacobian of the heads' outputs w.r.t. the value weight rows of group g."""
        arch, d = self.arch, self.arch.head_dim
        repeats = arch.n_heads // arch.n_kv_heads
        d_in = self.inputs["v"].shape[-1]
        blocks = torch.zeros(arch.n_kv_heads, d * d_in, d * d_in, dtype=torch.float64)
        for s in range(N_SEGMENTS):
            jac = self.jacobian(s, "v", 1)  # (L, H·d, L_t, n_kv·d): ∂ head outputs / ∂ value outputs
            x = self.inputs["v"][s].double()
            for g in range(arch.n_kv_heads):
                heads = jac[:, g * repeats * d:(g + 1) * repeats * d, :, g * d:(g + 1) * d]
                by_weight = torch.einsum("ortc,ti->orci", heads, x).reshape(-1, d * d_in)  # ∂/∂W_V rows of g
                blocks[g] += by_weight.T @ by_weight
        return blocks * 2 / (N_SEGMENTS * LENGTH * repeats)


def assert_matrix_close(actual: torch.Tensor, exact: torch.Tensor, tolerance: float = 1e-4) -> None:
    error = ((actual.double() - exact).norm() / exact.norm()).item()
    assert error < tolerance, error


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def probed():
    """family → (collected Hessians of block 0, brute-force probe of block 0); built once per family."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build(family)
            arch = local_architecture(model)
            ids = segments()
            cache[family] = (collect(model, arch, ids), AttentionProbe(model, arch, ids))
        return cache[family]

    return get


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_the_test_attention_is_the_eager_attention(probed, family):
    _, probe = probed(family)
    scores, _ = probe.run(0, "q", torch.zeros(LENGTH, probe.width("q")))
    probs = torch.softmax(scores + torch.where(probe.visible, 0.0, float("-inf")), -1)
    torch.testing.assert_close(probs, probe.probs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("kind", ["q", "k"])
def test_row_hessian_is_the_gauss_newton_matrix_of_the_scores(probed, family, kind):
    hessians, probe = probed(family)
    actual = hessians.row[probe.layers[kind].name]
    exact = probe.exact_row_hessians(kind)
    assert actual.shape == exact.shape
    assert_matrix_close(actual, exact)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_attention_weighted_row_hessian_is_the_gauss_newton_matrix_of_each_querys_score_variance(probed, family,
                                                                                                 monkeypatch):
    """The collector's sketched estimate (aptq.geometry.attention_weighted_rows) with many sketches reaches the exact
    matrices built from the family module's own Jacobian and probabilities, for q and k."""
    monkeypatch.setattr("aptq.hessian.ROW_SKETCHES", 4000)
    _, probe = probed(family)
    model = build(family)
    arch = local_architecture(model)
    hessians = collect(model, arch, segments(), row_weights="attention")
    for kind in ("q", "k"):
        assert_matrix_close(hessians.row[probe.layers[kind].name], probe.exact_row_hessians(kind, "attention"), 0.03)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_value_hessian_is_jtj_of_the_head_outputs(probed, family):
    hessians, probe = probed(family)
    actual = hessians.value[probe.layers["v"].name]
    exact = probe.exact_value_hessians()
    eye = torch.eye(probe.arch.head_dim, dtype=torch.float64)
    for g in range(probe.arch.n_kv_heads):
        assert_matrix_close(torch.kron(eye, actual[g].double()), exact[g])


def test_sliding_window_layers_use_their_own_mask(probed):
    _, probe = probed("mistral")
    seen = probe.visible.sum(1)
    assert seen.max().item() == WINDOW and seen[0].item() == 1  # the window, not the causal prefix, reached the scores
    _, full = probed("llama")
    assert full.visible.sum(1)[-1].item() == LENGTH


@pytest.mark.parametrize("family, pairing, rotary", [("llama", "half", 16), ("cohere", "interleaved", 16),
                                                     ("phi", "half", 8), ("stablelm", "half", 4),
                                                     ("gpt_neox", "half", 4), ("falcon", "half", 16)])
def test_rotary_layout_reproduces_the_modules_rotation(family, pairing, rotary):
    """R_p of `rotary_layout` applied to the projection output is the module's post-RoPE query (fused modules too)."""
    model = build(family)
    names = ("layers.0.self_attn", "layers.0.attention", "h.0.self_attention")
    attention = next(m for name, m in model.named_modules() if name.endswith(names))
    calls = {}
    attention.register_forward_pre_hook(lambda m, a, k: calls.update(kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=segments(), use_cache=False)
    cos, sin = calls["kwargs"]["position_embeddings"]
    d = model.config.hidden_size // model.config.num_attention_heads
    layout = rotary_layout((cos, sin), LENGTH, d, torch.device("cpu"))
    assert cos.shape[-1] == rotary
    first, second = layout.order[0].item(), layout.order[d // 2].item()
    assert (first, second) == ((0, rotary // 2) if pairing == "half" else (0, 1))
    # The family's own rotary function on the first `rotary` coordinates; the rest pass unrotated, as every module
    # of the list does it (Phi and StableLM split before calling it, GPT-NeoX inside).
    module = __import__(type(attention).__module__, fromlist=["apply_rotary_pos_emb"])
    pre = torch.randn(N_SEGMENTS, 3, LENGTH, d, generator=torch.Generator().manual_seed(2))
    rotated = torch.cat([module.apply_rotary_pos_emb(pre[..., :rotary], pre[..., :rotary], cos, sin)[0],
                         pre[..., rotary:]], -1)
    torch.testing.assert_close(layout.rotate(pre), rotated, rtol=1e-5, atol=1e-5)


def test_geometry_cache_tells_masks_and_rotations_apart():
    """Blocks share the cache: a sliding-window layer, or a layer rotating with another base (Gemma 3's local layers),
    must not get the geometry of another."""
    model = build("gemma3_text")
    positions = torch.arange(LENGTH)[None]
    local, full = (model.model.rotary_emb(torch.zeros(1), positions, kind) for kind in ("sliding_attention",
                                                                                        "full_attention"))
    causal = torch.zeros(LENGTH, LENGTH).masked_fill(torch.ones(LENGTH, LENGTH).triu(1).bool(), torch.finfo().min)
    window = causal.masked_fill(torch.ones(LENGTH, LENGTH).tril(-WINDOW).bool(), torch.finfo().min)
    cache = {}
    geometries = [geometry_for(mask, rope, 16, cache) for mask in (causal, window) for rope in (local, full)]
    assert len(cache) == 4 and len({id(g) for g in geometries}) == 4
    assert geometry_for(window.clone(), local, 16, cache) is geometries[2]
    assert geometries[2].query_ranges[1][-1] - geometries[2].query_ranges[0][-1] == WINDOW


def test_layout_round_trip_of_matrices():
    layout = RotaryLayout(torch.tensor([0, 2, 1, 3]), torch.ones(1, 2, dtype=torch.complex64))
    matrix = torch.arange(16.0).reshape(4, 4)
    half = layout.to_half(layout.to_half(matrix).T).T  # rows and columns permuted
    torch.testing.assert_close(layout.from_half_matrix(half), matrix)


def test_the_sandwiched_sum_is_the_sum_of_the_explicit_per_position_products():
    """Σ_r J_rᵀ M_r J_r with J_r = s_r diag(gain) (I − u_r u_rᵀ), each product formed as d × d matrices, in float64."""
    torch.manual_seed(0)
    length, d = 12, 8
    xi = torch.randn(length, 5, d // 2, dtype=torch.complex128)
    hermitian = xi.transpose(1, 2) @ xi.conj()  # per position Σ ξ ξᴴ and Σ ξ ξᵀ, as mapped_middle forms them
    pseudo = xi.transpose(1, 2) @ xi
    middle = torch.stack([hermitian, pseudo], 1)
    jacobian = NormJacobian(torch.rand(length, dtype=torch.float64), torch.randn(length, d, dtype=torch.float64),
                            torch.rand(d, dtype=torch.float64))
    expected = torch.zeros(d, d, dtype=torch.float64)
    for r in range(length):
        u = jacobian.direction[r]
        J = jacobian.scale[r] * torch.diag(jacobian.gain) @ (torch.eye(d, dtype=torch.float64) - torch.outer(u, u))
        expected += J.T @ complex_to_real(middle[r]) @ J
    torch.testing.assert_close(sandwiched_sum(middle, jacobian), expected)
    torch.testing.assert_close(sandwiched_sum(middle, None), complex_to_real(middle.sum(0)))


@pytest.mark.parametrize("family, overrides, message", [
    ("cohere", dict(use_qk_norm=True), "not an RMS norm over one axis"),  # a LayerNorm per head, weights per head
    ("phi", dict(qk_layernorm=True), "not made the way the row Hessians assume"),  # nn.LayerNorm: mean removed
])
def test_a_query_path_the_geometry_does_not_know_is_refused(family, overrides, message):
    """q/k LayerNorms subtract the mean: not the RMS norm the row Hessians linearise, so the model is refused."""
    model = build(family, **overrides)
    with pytest.raises(UserError, match=message):
        collect(model, local_architecture(model), segments())


def test_falcon_with_alibi_is_layer_wise_and_its_attention_is_not_recorded():
    """With ALiBi transformers' eager and SDPA Falcon disagree (eager adds the bias twice): the adapter takes such a
    model off the attention-aware path, and the collector, made to try, refuses instead of recording nothing."""
    model = build("falcon", alibi=True)
    arch = architecture_of(model.config)
    assert not arch.attention_aware and "ALiBi" in arch.attention_unavailable_reason
    with pytest.raises(UserError, match="probabilities cannot be recorded"):
        collect(model, replace(arch, attention_aware=True), segments())


@pytest.mark.parametrize("family", ["falcon", "falcon_gqa", "falcon_mha"])
def test_recorded_falcon_attention_is_the_modules_own(family):
    """While recorded, Falcon's attention (routed through the attention interface) gives its inline forward's output
    and probabilities in each fused layout, with one key per KV head; afterwards the module has its own forward."""
    model = build(family)
    attention = model.transformer.h[0].self_attention
    seen, calls = {}, []
    attention.register_forward_pre_hook(lambda m, a, k: seen.update(call=(a, k)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=segments(), use_cache=False)
        own = attention(*seen["call"][0], **seen["call"][1])
        with recording_attention(attention, calls.append):
            recorded = attention(*seen["call"][0], **seen["call"][1])
    for mine, theirs in zip(recorded, own):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1 and calls[0].key.shape[1] == local_architecture(model).n_kv_heads
    assert "forward" not in vars(attention)


def test_full_attention_block_after_a_sliding_one_gets_its_own_mask():
    model = build("gemma2")
    arch = local_architecture(model)
    ids = segments()
    hessians, probe = collect(model, arch, ids, block=1), AttentionProbe(model, arch, ids, block=1)
    assert probe.visible.sum(1)[-1].item() == LENGTH  # the model's own call: full attention
    assert_matrix_close(hessians.row[probe.layers["q"].name], probe.exact_row_hessians("q"))


def test_row_sketches_spread_over_calibration_sets_above_eight_segments():
    """4 per segment up to 8 segments; beyond, their 32 spread over the segments, at least one each."""
    from aptq.hessian import sketches_per_segment

    assert [sketches_per_segment(n) for n in (1, 4, 8, 16, 32, 64, 128)] == [4, 4, 4, 2, 1, 1, 1]
