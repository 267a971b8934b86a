"""Brute-force checks of the block walk and of every Hessian kind on tiny models (float32, a few segments)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from aptq.capture import BlockWalk
from aptq.geometry import output_norm_modules
from aptq.hessian import CollectOptions, HessianCollector
from aptq.models import get_weight

N_SEGMENTS, LENGTH = 5, 16


def segments(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 5000, (N_SEGMENTS, LENGTH), generator=torch.Generator().manual_seed(seed))


def collect(model, arch, ids, block=0, probes=0, batch_size=2, attention=True):
    for step in BlockWalk(model, arch, ids, batch_size=batch_size, stop=block + 1):
        if step.index == block:
            with HessianCollector(step, arch, CollectOptions(attention=attention, probes=probes, seed=3)) as collector:
                for batch in step.batches():
                    step.keep_output(batch, collector.process(batch))
            return collector.result()


def reference(model, arch, ids, block=0):
    """What a plain eager forward shows at `block`: linear inputs/outputs, attention probabilities and call args."""
    blocks = model.get_submodule(arch.blocks_path)
    attention = blocks[block].get_submodule(arch.attention_attr)
    seen: dict = {}
    handles = [attention.register_forward_pre_hook(lambda m, a, k: seen.update(attn_call=(a, k)), with_kwargs=True),
               attention.register_forward_hook(lambda m, a, out: seen.update(probs=out[1].detach()))]
    if arch.mlp_attr:
        mlp = blocks[block].get_submodule(arch.mlp_attr)
        handles.append(mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0].detach())))
    for layer in arch.block_layers(block):
        module = model.get_submodule(layer.module_path)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, kind=layer.kind: seen.update({f"x_{kind}": a[0].detach().reshape(N_SEGMENTS, LENGTH, -1)})))
        handles.append(module.register_forward_hook(
            lambda m, a, out, kind=layer.kind: seen.update({f"y_{kind}": out.detach()})))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


# Three blocks, so that block 1's output (the next block's input) is checked: Gemma's sliding-window and
# full-attention layers get different masks (and Gemma 3 different rotations) from the model.
THREE_BLOCKS = {"llama": {}, "opt": {}, "gpt2": {"n_layer": 3},
                "gemma2": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                "gemma3_text": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}}


@pytest.mark.parametrize("family", THREE_BLOCKS)
def test_walk_inputs_are_the_models_hidden_states(tiny_model, family):
    model, arch = tiny_model(family, num_hidden_layers=3, **THREE_BLOCKS[family])
    ids = segments()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for step in BlockWalk(model, arch, ids, batch_size=2):
        inputs = torch.cat([batch.hidden for batch in step.batches()])
        torch.testing.assert_close(inputs, hidden[step.index], rtol=1e-5, atol=1e-5)


def test_next_block_sees_the_modified_block(tiny_model):
    model, arch = tiny_model("llama")
    ids = segments()
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1]
    for step in BlockWalk(model, arch, ids, batch_size=3):
        if step.index == 0:
            with torch.no_grad():
                get_weight(model, arch.block_layers(0)[3]).zero_()  # o_proj: the caller "quantizes" the block
        else:
            seen = torch.cat([batch.hidden for batch in step.batches()])
    with torch.no_grad():
        after = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1]
    torch.testing.assert_close(seen, after, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen, before)


@pytest.mark.parametrize("family, kind", [("llama", "q"), ("llama", "down"), ("gpt2", "q"), ("opt", "o")])
def test_layerwise_hessian_is_the_hessian_of_the_output_error(tiny_model, family, kind):
    model, arch = tiny_model(family)
    ids = segments()
    hessians = collect(model, arch, ids, attention=False)
    layer = next(layer for layer in arch.block_layers(0) if layer.kind == kind)
    x = reference(model, arch, ids)[f"x_{kind}"].reshape(-1, layer_in := get_weight(model, layer).shape[1]).double()
    row = get_weight(model, layer)[0].detach().double()
    # ‖w X‖² / N for one output row: its Hessian is (2/N) X Xᵀ, the same for every row.
    exact = torch.autograd.functional.hessian(lambda w: (x @ w).square().sum() / x.shape[0], row)
    assert exact.shape == (layer_in, layer_in)
    torch.testing.assert_close(hessians.layerwise[layer.name].double(), exact, rtol=1e-4, atol=1e-6)
    assert hessians.tokens == N_SEGMENTS * LENGTH


def test_value_hessian_is_jtj_of_the_head_outputs_with_gqa_averaging(tiny_model):
    model, arch = tiny_model("llama")  # 4 query heads, 2 KV heads
    ids = segments()
    hessians = collect(model, arch, ids)
    seen = reference(model, arch, ids)
    v_layer = arch.block_layers(0)[2]
    weight = get_weight(model, v_layer).detach()
    repeats, d_h = arch.n_heads // arch.n_kv_heads, arch.head_dim
    x = seen["x_v"]  # (n, L, d_in)
    for g in range(arch.n_kv_heads):
        probs = seen["probs"][:, g * repeats:(g + 1) * repeats]  # the eager path's A_h for the heads of group g

        def head_outputs(w_g: torch.Tensor) -> torch.Tensor:  # A_h X W_V,gᵀ for every segment and head of g
            return probs @ (x @ w_g.T)[:, None]

        jacobian = torch.autograd.functional.jacobian(head_outputs, weight[g * d_h:(g + 1) * d_h])
        jacobian = jacobian.reshape(-1, weight.shape[1] * d_h).double()
        exact = jacobian.T @ jacobian * (2 / (N_SEGMENTS * LENGTH * repeats))  # = I_{d_h} ⊗ H_V,g
        expected = torch.kron(torch.eye(d_h, dtype=torch.float64), hessians.value[v_layer.name][g].double())
        torch.testing.assert_close(expected, exact, rtol=1e-4, atol=1e-7)


def rotations(model, length: int, head_dim: int) -> torch.Tensor:
    """R_p (L × d × d) built by applying the model's own rotary embedding to the unit vectors."""
    positions = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    eye = torch.eye(head_dim)[None, None]
    return torch.stack([apply_rotary_pos_emb(eye, eye, cos[:, p].expand(head_dim, -1)[None],
                                             sin[:, p].expand(head_dim, -1)[None])[0][0, 0].T
                        for p in range(length)]).double()


def explicit_row_hessian(vectors: torch.Tensor, rot: torch.Tensor, mapped_by_query: bool) -> torch.Tensor:
    """Σ over causal pairs (p, j ≤ p) of ω_pj R_mᵀ v vᵀ R_m, averaged over the leading (segment × head) axis.

    G_Q: v = the key at j (after RoPE), m = p; G_K: v = the query at p (after RoPE), m = j. ω_pj = 1 / (L (p + 1)).
    """
    length, dim = vectors.shape[1], vectors.shape[2]
    total = torch.zeros(dim, dim, dtype=torch.float64)
    for p in range(length):
        for j in range(p + 1):
            v = vectors[:, j] if mapped_by_query else vectors[:, p]
            r = rot[p] if mapped_by_query else rot[j]
            mapped = v @ r  # rows: (R_mᵀ v)ᵀ
            total += mapped.T @ mapped / (length * (p + 1))
    return total / vectors.shape[0]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_row_hessians_match_the_explicit_rope_mapped_sums(tiny_model, family):
    model, arch = tiny_model(family)
    ids = segments()
    hessians = collect(model, arch, ids)
    seen = reference(model, arch, ids)
    d_h, repeats = arch.head_dim, arch.n_heads // arch.n_kv_heads
    rot = rotations(model, LENGTH, d_h) if arch.rope else torch.eye(d_h, dtype=torch.float64).expand(LENGTH, -1, -1)
    # Pre-RoPE projections from the plain forward (q without OPT's scaling), rotated with the explicit R_p.
    queries = seen["y_q"].reshape(N_SEGMENTS, LENGTH, arch.n_heads, d_h).transpose(1, 2).double()
    keys = seen["y_k"].reshape(N_SEGMENTS, LENGTH, arch.n_kv_heads, d_h).transpose(1, 2).double()
    queries = torch.einsum("pab,nhpb->nhpa", rot, queries)
    keys = torch.einsum("pab,nhpb->nhpa", rot, keys)
    q_name, k_name = arch.block_layers(0)[0].name, arch.block_layers(0)[1].name
    for g in range(arch.n_kv_heads):
        g_q = explicit_row_hessian(keys[:, g], rot, mapped_by_query=True)
        g_k = explicit_row_hessian(queries[:, g * repeats:(g + 1) * repeats].reshape(-1, LENGTH, d_h), rot,
                                   mapped_by_query=False)
        for h in range(g * repeats, (g + 1) * repeats):
            torch.testing.assert_close(hessians.row[q_name][h].double(), g_q, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hessians.row[k_name][g].double(), g_k, rtol=1e-4, atol=1e-6)


def exact_lm_traces(model, arch, seen, layers, block=0) -> dict[str, float]:
    """(2/N) Σ_s ‖∂F_s/∂W‖²_F from full Jacobians: F = the attention output (q/k/v/o) or the MLP output, after the
    block's post-norm where it has one."""
    blocks = model.get_submodule(arch.blocks_path)
    attention = blocks[block].get_submodule(arch.attention_attr)
    mlp = blocks[block].get_submodule(arch.mlp_attr) if arch.mlp_attr else None
    args, kwargs = seen["attn_call"]
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    post_norms = output_norm_modules(blocks[block])
    traces = {}
    for layer in layers:
        in_attention = layer.kind in ("q", "k", "v", "o")
        module = attention if in_attention else mlp
        post_norm = post_norms.get("o" if in_attention else "down", lambda y: y)
        prefix = f"{arch.blocks_path}.{block}.{arch.attention_attr if in_attention else arch.mlp_attr}."
        param = layer.module_path.removeprefix(prefix) + ".weight"
        weight = module.get_parameter(param).detach()
        total = 0.0
        for s in range(N_SEGMENTS):
            def output(w: torch.Tensor) -> torch.Tensor:
                if in_attention:
                    sliced = {k: (v[s:s + 1] if isinstance(v, torch.Tensor) and v.shape[0] == N_SEGMENTS else v)
                              for k, v in kwargs.items()}
                    return post_norm(functional_call(module, {param: w}, (hidden[s:s + 1], *args[1:]), sliced)[0])
                return post_norm(functional_call(module, {param: w}, (seen["mlp_in"][s:s + 1],)))

            jacobian = torch.autograd.functional.jacobian(output, weight, vectorize=True)
            total += jacobian.double().square().sum().item()
        traces[layer.name] = 2 * total / (N_SEGMENTS * LENGTH)
    return traces


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3_text"])
def test_hutchinson_traces_agree_with_the_full_jacobian(tiny_model, family):
    model, arch = tiny_model(family, **({"initializer_range": 0.3} if family == "gemma3_text" else {}))
    ids = segments()
    hessians = collect(model, arch, ids, probes=24)
    seen = reference(model, arch, ids)
    # OPT's fc1/fc2 sit on the block (no MLP module to differentiate on its own): check its attention layers.
    layers = [layer for layer in arch.block_layers(0) if arch.mlp_attr or layer.kind in ("q", "k", "v", "o")]
    for name, value in exact_lm_traces(model, arch, seen, layers).items():
        estimate, se = hessians.lm_trace[name], hessians.lm_trace_se[name]
        assert abs(estimate - value) <= 4 * se, (name, estimate, value, se)
        assert abs(estimate - value) <= 0.25 * value, (name, estimate, value)


def test_value_trace_closed_form(tiny_model):
    model, arch = tiny_model("opt")  # no GQA: J = (A_h Xᵀ) ⊗ W_O,h per head
    ids = segments()
    seen = reference(model, arch, ids)
    layers = {layer.kind: layer for layer in arch.block_layers(0)}
    w_o = get_weight(model, layers["o"]).detach().double()
    x = seen["x_v"].double()
    d_h = arch.head_dim
    closed = 0.0
    for h in range(arch.n_heads):
        weighted = seen["probs"][:, h].double() @ x  # A_h Xᵀ per segment (rows: queries)
        closed += weighted.square().sum().item() * w_o[:, h * d_h:(h + 1) * d_h].square().sum().item()
    closed *= 2 / (N_SEGMENTS * LENGTH)
    assert exact_lm_traces(model, arch, seen, [layers["v"]])[layers["v"].name] == pytest.approx(closed, rel=1e-4)
    hessians = collect(model, arch, ids, probes=24)
    estimate, se = hessians.lm_trace[layers["v"].name], hessians.lm_trace_se[layers["v"].name]
    assert abs(estimate - closed) <= 4 * se


def test_traces_do_not_depend_on_the_batch_size(tiny_model):
    model, arch = tiny_model("gpt2")
    ids = segments()
    small, large = collect(model, arch, ids, probes=2, batch_size=2), collect(model, arch, ids, probes=2, batch_size=5)
    for name, value in small.lm_trace.items():
        assert large.lm_trace[name] == pytest.approx(value, rel=1e-4)
    for name, value in small.layerwise.items():
        torch.testing.assert_close(large.layerwise[name], value, rtol=1e-4, atol=1e-6)


def test_collector_leaves_the_model_as_it_was(tiny_model):
    model, arch = tiny_model("llama")
    ids = segments()
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    collect(model, arch, ids, probes=1)
    assert model.config._attn_implementation == "eager"
    blocks = model.get_submodule(arch.blocks_path)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in blocks.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "olmo2"])
def test_residual_size_is_the_median_norm_after_each_add(tiny_model, family):
    """After the attention add: block input + attention output, through the block's post-norm where it has one."""
    model, arch = tiny_model(family)
    ids = segments()
    hessians = collect(model, arch, ids, attention=False)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        attention_out = reference(model, arch, ids)["y_o"].reshape_as(hidden[0])
        post_norm = output_norm_modules(model.get_submodule(f"{arch.blocks_path}.0")).get("o")
        if family in ("gemma3_text", "olmo2"):
            attention_out = post_norm(attention_out)
        else:
            assert post_norm is None
    for module, stream in (("attention", hidden[0] + attention_out), ("mlp", hidden[1])):
        expected = stream.square().sum(-1).flatten().median().item()
        assert hessians.residual[module] == pytest.approx(expected, rel=1e-5)
