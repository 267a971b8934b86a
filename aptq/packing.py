"""Integer codes packed into int32 words, as the GPTQ and compressed-tensors checkpoint formats lay them out.

Both formats (compressed-tensors since its dense packing; earlier releases put ⌊32/b⌋ values in each word) write the
b-bit values of a row as one little-endian bit stream cut into 32-bit words: value i occupies bits i·b … i·b + b − 1
of the stream, so a 3-bit value may straddle two words (32 values fill 3 words exactly); 2, 4 and 8 bits divide 32
and never straddle. A row that does not fill its last word leaves the rest zero. GPTQ packs the codes along the input
dimension (`qweight`: d_in·b/32 × d_out) and the zero points along the output dimension (`qzeros`:
n_groups × d_out·b/32); compressed-tensors packs each output row's codes (`weight_packed`: d_out × ⌈d_in·b/32⌉) and
the zero points along the output rows (`weight_zero_point`: ⌈d_out·b/32⌉ × n_groups), its signed values offset by
2^(b−1), i.e. our unsigned codes.
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
    """Values (n × cols, each in 0 … 2^b − 1) as one bit stream per column along dim 0: (⌈n·b/32⌉ × cols) int32."""
    n, cols = values.shape
    padded_n = math.ceil(n / WORD_BITS) * WORD_BITS  # 32 values always end on a word boundary
    source = torch.zeros(padded_n, cols, dtype=torch.int64)
    source[:n] = values.to(torch.int64)
    words = torch.zeros(padded_n * bits // WORD_BITS, cols, dtype=torch.int64)
    for position in range(WORD_BITS):  # each position in a run of 32 values: every run at once
        word, shift = divmod(position * bits, WORD_BITS)
        chunk = source[position::WORD_BITS]
        targets = torch.arange(chunk.shape[0]) * bits + word
        words[targets] |= (chunk << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:  # the value's high bits spill into the next word
            words[targets + 1] |= chunk >> (WORD_BITS - shift)
    return _to_int32(words[:math.ceil(n * bits / WORD_BITS)])
