"""Tiny random models of every family the tool is tested on, built from stock configs, and saved as HF directories.

Each family's stock config (transformers' defaults) is shrunk to two blocks of width 64 with 4 query heads of size 16
(2 KV heads where the family has GQA), keeping what makes the family different: partial or interleaved rotary
embeddings, q/k normalisation, query scaling and logit soft-capping, sliding-window layers, multi-query attention,
fused projections, mixtures of experts. They reuse the embedded model's tokenizer, so a vocabulary of 49152 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from aptq.models import resolve_source

VOCAB = 49152
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 96
BLOCKS = 2
WINDOW = 8  # sliding-window layers see this many keys: shorter than the test segments, so the mask matters

# The common shape, in each family's own config names.
_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, max_position_embeddings=256)
_TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None)

TINY_CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE | dict(tie_word_embeddings=True),
    "mistral": _LLAMA_LIKE | dict(sliding_window=WINDOW),
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE | dict(head_dim=HEAD_DIM),  # q_norm / k_norm per head before RoPE
    "gemma": _LLAMA_LIKE | dict(head_dim=HEAD_DIM),
    "gemma2": _LLAMA_LIKE | dict(head_dim=HEAD_DIM, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                                 sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": _LLAMA_LIKE | dict(head_dim=HEAD_DIM, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, partial_rotary_factor=0.5, max_position_embeddings=256),
    "phi3": _LLAMA_LIKE,  # fused qkv_proj and gate_up_proj
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                     rotary_pct=0.25, max_position_embeddings=256),  # fused, per-head interleaved query_key_value
    "falcon": dict(hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS, multi_query=True,
                   new_decoder_architecture=False, max_position_embeddings=256),  # a single KV head
    "olmo2": _LLAMA_LIKE,  # q_norm / k_norm over the whole projection before RoPE
    "stablelm": _LLAMA_LIKE | dict(partial_rotary_factor=0.25),
    "starcoder2": _LLAMA_LIKE | dict(sliding_window=WINDOW),
    "granite": _LLAMA_LIKE | dict(attention_multiplier=0.1, residual_multiplier=0.5, embedding_multiplier=2.0,
                                  logits_scaling=4.0),
    "cohere": _LLAMA_LIKE | dict(use_qk_norm=False),  # interleaved rotary pairs, parallel attention and MLP
    "mixtral": _LLAMA_LIKE | dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": _LLAMA_LIKE | dict(head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                max_position_embeddings=256, word_embed_proj_dim=HIDDEN),
    "gpt2": dict(n_embd=HIDDEN, n_layer=BLOCKS, n_head=HEADS, n_positions=256),
}
FAMILIES = tuple(TINY_CONFIGS)


def tiny_config(family: str):
    if family not in TINY_CONFIGS:
        raise ValueError(family)
    return CONFIG_MAPPING[family](**(_TOKENS | TINY_CONFIGS[family]))


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(str(directory))
    embedded_dir, _, _ = resolve_source("embedded")
    AutoTokenizer.from_pretrained(str(embedded_dir)).save_pretrained(str(directory))
    return directory
