"""Which layers a plan or a run covers, and its bits counted over those layers and over the whole model.

A plan made from an analysis of the first blocks only decides the widths of those blocks' layers; the rest of the
model stays in FP16. Its budget and its predicted error are over the analysed layers, while a run's size is over the
whole model: a 3.00-bit plan over 4 of 30 blocks makes a model of about 14.3 average bits. Both numbers are kept,
labelled, and runs of different coverage are never compared (aptq.tradeoffs).

The coverage of a plan is the set of layers it names (a layer pinned to FP16 is still covered: keeping it is a
decision of the plan); a stored run without a recorded coverage falls back to its quantized layers.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from aptq.allocate import FULL_PRECISION, AllocationRequest, allocate, summarize, weight_size
from aptq.data import digest
from aptq.models import Architecture

FIELDS = ("coverage", "covered_avg_bits", "covered_effective_bits")  # the run columns this module fills


@dataclass(frozen=True)
class Coverage:
    label: str  # "all 30 blocks", "blocks 0–3 of 30", or "12 of 210 layers (1a2b3c4d)": also the comparison key
    layers: frozenset[str]
    whole_model: bool


def coverage_of(arch: Architecture, names: Iterable[str]) -> Coverage:
    """The coverage of the layers `names`: whole blocks are named by their range, anything else by a count and a
    short digest of the set (so two different sets never share a label)."""
    chosen = frozenset(names) & {layer.name for layer in arch.layers}
    blocks = sorted({layer.block for layer in arch.layers if layer.name in chosen})
    whole_blocks = chosen == {layer.name for layer in arch.layers if layer.block in blocks}
    contiguous = bool(blocks) and blocks == list(range(blocks[0], blocks[-1] + 1))
    if whole_blocks and len(blocks) == arch.n_blocks:
        return Coverage(f"all {arch.n_blocks} blocks", chosen, True)
    if whole_blocks and contiguous:
        span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}–{blocks[-1]}"
        return Coverage(f"{span} of {arch.n_blocks}", chosen, False)
    return Coverage(f"{len(chosen)} of {len(arch.layers)} layers ({digest(*sorted(chosen))[:8]})", chosen, False)


def covered_size(table: pd.DataFrame, plan: Mapping[str, int], covered: Collection[str],
                 group_size: int | np.ndarray) -> dict[str, float]:
    """avg_bits and effective_bits of the covered layers only (`table`: aptq.pipeline.layer_table rows; `group_size`:
    one for all, or one per row of `table`)."""
    chosen = table["layer"].isin(set(covered)).to_numpy()
    rows = table[chosen]
    bits = np.array([int(plan.get(name, FULL_PRECISION)) for name in rows["layer"]])
    size = weight_size(rows, bits, group_size if np.isscalar(group_size) else np.asarray(group_size)[chosen])
    return {"covered_avg_bits": size["avg_bits"], "covered_effective_bits": size["effective_bits"]}


def run_fields(arch: Architecture, table: pd.DataFrame, plan: Mapping[str, int],
               group_size: int | np.ndarray) -> dict:
    """The coverage columns of a run row, from the plan as given (before layers it does not name are filled in)."""
    coverage = coverage_of(arch, plan)
    return {"coverage": coverage.label} | covered_size(table, plan, coverage.layers, group_size)


def fill_coverage(runs: pd.DataFrame, arch: Architecture, table: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the coverage columns on every row: rows stored before coverage was recorded get the coverage of
    their quantized layers and their bits over those layers (`table`: aptq.pipeline.layer_table)."""
    runs = runs.assign(**{c: runs[c] if c in runs else None for c in FIELDS})
    missing = runs["coverage"].isna()
    if not missing.any():
        return runs
    runs = runs.astype({"covered_avg_bits": float, "covered_effective_bits": float})
    for index in runs.index[missing]:
        plan = json.loads(runs.at[index, "plan"])
        covered = coverage_of(arch, [name for name, bits in plan.items() if bits < FULL_PRECISION])
        fields = {"coverage": covered.label} | covered_size(table, plan, covered.layers,
                                                            int(runs.at[index, "group_size"]))
        for column, value in fields.items():
            runs.at[index, column] = value
    return runs


def uniform_over(layers: pd.DataFrame, errors: pd.DataFrame, bits: int, group_size: int
                 ) -> tuple[dict[str, int], dict]:
    """Every layer of an analysis at `bits`, and the plan's summary (predicted errors included): the uniform plan
    covers exactly the analysed layers, so it is comparable with the plans made from the same analysis."""
    plan = allocate(layers, errors, AllocationRequest(float(bits), "uniform", (int(bits),), group_size=group_size))
    return dict(plan.bits), summarize(plan, layers, errors)


def prediction_applies(plan: Mapping[str, int], layers: pd.DataFrame) -> bool:
    """An analysis's predicted error describes a plan only when the plan covers exactly the analysed layers."""
    return set(plan) == set(layers["layer"])


def whole_model_size(table: pd.DataFrame, plan: Mapping[str, int], group_size: int | np.ndarray) -> dict[str, float]:
    """avg_bits, effective_bits and size_mb over every quantizable layer of the model (`table`:
    aptq.pipeline.layer_table), the layers the plan does not name in FP16: what a run of the plan measures."""
    bits = np.array([int(plan.get(name, FULL_PRECISION)) for name in table["layer"]])
    return weight_size(table, bits, group_size)
