"""Integer codes packed into int32 words, as the GPTQ and compressed-tensors checkpoint formats lay them out.

Both formats fill each word from its least significant bit. They differ in how a word holds b-bit values:

- GPTQ (`pack_stream`): the values form one little-endian bit stream cut into 32-bit words, so a 3-bit value may
  straddle two words (32 values fill 3 words exactly); 2, 4 and 8 bits divide 32 and never straddle. Codes are
  packed along the input dimension (`qweight`: d_in·b/32 × d_out), zero points along the output dimension (`qzeros`:
  n_groups × d_out·b/32).
- compressed-tensors `pack-quantized` (`pack_words`): ⌊32/b⌋ whole values per word, the last word of a row padded
  with zeros (10 values and 2 unused bits per word at 3 bits). Values are the signed codes offset by 2^(b−1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WORD_BITS = 32


def _to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit patterns (held in int64) as the int32 tensors the formats store (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_stream(values: Tensor, bits: int) -> Tensor:
    """Values (n × cols, each in 0 … 2^b − 1) as a bit stream along dim 0: (n·b/32 × cols) int32. n·b must be a
    multiple of 32."""
    n, cols = values.shape
    if n * bits % WORD_BITS:
        raise ValueError(f"{n} values of {bits} bits do not fill whole 32-bit words.")
    source = values.to(torch.int64)
    words = torch.zeros(n * bits // WORD_BITS, cols, dtype=torch.int64)
    period = math.lcm(bits, WORD_BITS) // bits  # values after which the stream is word-aligned again
    words_per_period = period * bits // WORD_BITS
    for position in range(period):  # each position in the period: one column of every period at once
        offset = position * bits
        word, shift = divmod(offset, WORD_BITS)
        chunk = source[position::period]
        targets = torch.arange(chunk.shape[0]) * words_per_period + word
        words[targets] |= (chunk << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:  # the value's high bits spill into the next word
            words[targets + 1] |= chunk >> (WORD_BITS - shift)
    return _to_int32(words)


def pack_words(values: Tensor, bits: int) -> Tensor:
    """Values (rows × n, each in 0 … 2^b − 1), ⌊32/b⌋ per word along dim 1, the last word zero-padded:
    (rows × ⌈n / ⌊32/b⌋⌉) int32."""
    rows, n = values.shape
    per_word = WORD_BITS // bits
    padded = torch.zeros(rows, math.ceil(n / per_word) * per_word, dtype=torch.int64)
    padded[:, :n] = values.to(torch.int64)
    grouped = padded.view(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    return _to_int32((grouped << shifts).sum(dim=2))
