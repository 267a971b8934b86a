"""Tiny random models of each supported family, built from configs and saved as HF directories for loading tests.

They reuse the embedded model's tokenizer, so a vocabulary of 49152 tokens; everything else is a few thousand
parameters per block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, OPTConfig

from aptq.models import resolve_source

VOCAB = 49152


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(family)


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(str(directory))
    embedded_dir, _, _ = resolve_source("embedded")
    AutoTokenizer.from_pretrained(str(embedded_dir)).save_pretrained(str(directory))
    return directory
