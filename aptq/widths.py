"""Bit widths shared by the budget solvers, the quantizer, the pipeline and the exports (no heavy imports)."""

FP16_BITS = 16  # bits of one fp16 number
FULL_PRECISION = FP16_BITS  # the plan width of a layer kept unquantized: it is stored (and budgeted) in fp16
QUANT_WIDTHS = range(2, 9)  # the widths a layer may be quantized to
SCALE_ZERO_BITS = 2 * FP16_BITS  # one fp16 scale and one fp16 zero point per group
