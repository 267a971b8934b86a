"""Attention modules that compute their attention inline (Falcon) instead of calling transformers' attention
interface, given a forward that does call it while their block is collected, so the recorder sees them.

The replacement is built from the family's own pieces (its fused projection, head split and rotary function) and
computes what its eager forward computes: `tests/test_attention_geometry.py` differentiates the unmodified module
against the Hessians recorded through it. It is set on one module instance and removed afterwards.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _falcon_forward(module: nn.Module, hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                    attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None, layer_past=None,
                    use_cache: bool = False, output_attentions: bool = False,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """Falcon's eager attention without ALiBi (rotary queries and keys, scores scaled by 1/√d_h), through the
    attention function the config names. With ALiBi the module's own forward runs (nothing is recorded, and the
    collector says so)."""
    if alibi is not None:
        return type(module).forward(module, hidden_states, alibi, attention_mask, position_ids, layer_past,
                                    use_cache, output_attentions, position_embeddings, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    query, key, value = module._split_heads(module.query_key_value(hidden_states))  # (n, L, heads, d)
    if module.new_decoder_architecture:  # keys and values arrive copied to every query head: keep one per KV head
        repeats = module.num_heads // module.num_kv_heads
        key, value = key[:, :, ::repeats], value[:, :, ::repeats]
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]
    output, probs = attend(module, query, key, value, attention_mask, scaling=module.head_dim ** -0.5, dropout=0.0)
    return module.dense(output.reshape(*hidden_states.shape[:2], -1)), probs


# Attention classes that compute their attention inline, by class name (transformers' modeling modules are imported
# only for the families a model uses).
ROUTED_FORWARDS: dict[str, Callable] = {"FalconAttention": _falcon_forward}


@contextmanager
def routed_through_interface(attention: nn.Module) -> Iterator[None]:
    """While inside, `attention` calls transformers' attention interface (a no-op for modules that already do)."""
    forward = ROUTED_FORWARDS.get(type(attention).__name__)
    if forward is None:
        yield
        return
    attention.forward = types.MethodType(forward, attention)
    try:
        yield
    finally:
        del attention.forward
