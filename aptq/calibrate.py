"""A cross-layer unit measured on data: how much KL one unit of each layer's predicted error causes (docs/algorithms.md
§5, "the calibrated unit").

Noise `ΔW = σ_l Z` (Z standard normal, d_out × d_in) injected into layer l alone has the expected Hessian-weighted
size `E tr(ΔW H ΔWᵀ) = σ_l² · trace_layerwise(l)`, and under the attention-aware metric `σ_l² · trace_attention(l)`
(iid noise: every diagonal entry of each Hessian counts once per row). The KL divergence it causes on held-out
calibration segments gives the layer's rate `r_l = KL_l / σ_l²`, fitted through the origin over the noise levels:

    r_l = Σ_k KL_l,k σ_l,k² / Σ_k σ_l,k⁴,        KL ≈ Σ_l c_l · e(l, b_l)  with  c_l = r_l / trace_metric(l)

(the linearity argument of HIGGS: to second order the KL is a quadratic form in the weight errors, additive over layers
while they are small). aptq.allocate reads `kl_rate` and `kl_rate_se` (merged into the layers table by `with_unit`)
for its "calibrated" unit. What it assumes: an error of a given Hessian-weighted size reaches the output the same way
whatever its direction within the layer; quantization errors are not isotropic, so this is checked against measured
KL (bench/results/allocation_<quantizer>.md).

(our choice) The noise levels: σ_l² = err_layerwise(l, b) / trace_layerwise(l) for each width b of
`UnitSettings.noise_bits`, i.e. noise of the same Hessian-weighted size as the layer's own round-to-nearest error at
that width: the regime the plans live in, large enough to stand above float rounding.
(our choice) The validation part: the last `holdout` share of the analysis's calibration segments (never the
evaluation split). The Hessians of the analysis saw these segments too; the rates themselves are measured only here.
The standard error of `r_l` is that of its mean over the validation segments (one rate per segment).
(our choice) A negative fitted rate (a KL below float resolution: the true KL is ≥ 0) is set to 0, the constrained
least-squares estimate, with a warning naming the layers; its standard error is kept.
KL is measured as everywhere else in the tool: against the reference's top-k log-probabilities (aptq.evaluate).

Width multiples (`calibrate_widths`, docs/algorithms.md §5 "Width multiples"): for each width, the plan that puts every
analysed layer at that width is quantized by the quantizer that will run the plans, fitted on the calibration
segments before the validation part, and its KL on the validation part divided by its predicted total in the plans'
unit is the width's multiple (aptq.allocate.measured_width_multiples). (our choice) The candidate widths up to 4
bits are measured (the narrowest candidate when none is); wider ones take the nearest measured width's
(aptq.allocate.width_multiple): 8 bits' errors are a few thousandths of 4 bits' and its KL near float resolution.
Grid multiples (`calibrate_widths(grids=…)`): the same measurement on uniform plans in each other group size that
(bits, group size) candidates use, stored under the quantizer settings of that grid, so that pairs are priced by what
each grid delivers (aptq.allocate.option_multiples).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from aptq import analyses
from aptq.allocate import (
    PREDICTED_ERROR_ATTENTION,
    AllocationRequest,
    Plan,
    error_source_for,
    measured_width_multiples,
    summarize,
)
from aptq.capture import BlockWalk
from aptq.data import Corpus, Sampling, calibration_segments, digest, token_ids
from aptq.errors import UserError
from aptq.evaluate import ReferenceStats, evaluate, reference_stats, replayed_blocks
from aptq.models import LoadedModel, get_weight, set_weight
from aptq.pipeline import QuantizeSettings, check_plan, quantize_model, remove_checkpoints
from aptq.progress import Progress, no_progress
from aptq.store import Store

MIN_VALIDATION_SEGMENTS = 2  # the standard error of a mean needs two
WIDTH_HOLDOUT = 0.25  # (our choice) the validation share of the width multiples, the unit's
WIDEST_MEASURED = 4  # (our choice) widths above it take its multiple (module docstring)


@dataclass(frozen=True)
class UnitSettings:
    holdout: float = 0.25  # share of the calibration segments (the last ones) held out for the KL measurements
    noise_bits: tuple[int, ...] = (3,)  # noise as large as the layer's RTN error at these widths
    seed: int = 0

    def key(self, analysis_key: str) -> str:
        fields = asdict(self) | {"noise_bits": sorted(set(self.noise_bits))}
        return digest(analysis_key, json.dumps(fields, sort_keys=True))


@dataclass(frozen=True)
class WidthCalibration:
    """One width's measurement: the uniform plan's KL on the validation segments and its predicted total."""

    analysis: str
    unit: str  # the unit of `predicted` (aptq.allocate.UNIT_COLUMNS)
    source: str  # whose predicted errors (aptq.allocate.ERROR_SOURCES)
    settings: str  # width_settings: the quantizer that ran the plan, and the validation share
    bits: int
    kl: float
    predicted: float  # without multiples
    seconds: float


def width_settings(settings: QuantizeSettings) -> str:
    """How a width multiple was measured, as stored: the quantizer's key fields and the validation share."""
    return json.dumps(settings.key_fields() | {"holdout": WIDTH_HOLDOUT}, sort_keys=True)


def measured_widths(stored: pd.DataFrame, unit: str, source: str, settings: str) -> pd.DataFrame:
    """The rows of a load_widths table measured in `unit` with `source`'s errors and `settings`, with their
    group size and multiple; empty when none was."""
    rows = stored[(stored["unit"] == unit) & (stored["source"] == source) & (stored["settings"] == settings)]
    multiples = measured_width_multiples({int(r.bits): (r.kl, r.predicted) for r in rows.itertuples()})
    return rows.assign(group_size=json.loads(settings)["group_size"] if len(rows) else pd.Series(dtype="int64"),
                       multiple=rows["bits"].map(multiples)).reset_index(drop=True)


def grid_name(group: int) -> str:
    return f"groups of {group}" if group else "per channel"


def _family(settings: str) -> str:
    """A width_settings string without its group size: the measurements of one quantizer on every grid."""
    fields = json.loads(settings)
    del fields["group_size"]
    return json.dumps(fields, sort_keys=True)


@dataclass(frozen=True)
class MeasuredMultiples:
    """Multiples measured with one quantizer: at the plans' own group size, and on other grids."""

    widths: dict[int, float]  # bits → multiple (aptq.allocate.AllocationRequest.width_multiples)
    grids: dict[int, dict[int, float]]  # group size → bits → multiple (AllocationRequest.grid_multiples)

    def describe(self) -> str:
        text = ", ".join(f"{bits} bits ×{m:.3g}" for bits, m in self.widths.items())
        return text + "".join(f"; {grid_name(group)}: " + ", ".join(f"{bits} ×{m:.3g}" for bits, m in by_width.items())
                              for group, by_width in self.grids.items())


NO_MULTIPLES = MeasuredMultiples({}, {})  # a plan that charges no multiples


@dataclass(frozen=True)
class LayerUnit:
    """One layer's measurement: noise power per level, KL per level (mean over segments) and the fitted rate."""

    layer: str
    noise_ms: tuple[float, ...]  # σ² per noise level
    kl: tuple[float, ...]  # mean KL per noise level
    kl_rate: float  # r_l = fitted KL per unit σ²
    kl_rate_se: float  # its standard error over the validation segments
    seconds: float


def validation_count(n_segments: int, holdout: float) -> int:
    """How many of `n_segments` calibration segments are held out; one sentence when there are too few to split (a
    check that needs no data: callers make it before any work)."""
    if not 0 < holdout < 1:
        raise UserError(f"The validation share must lie strictly between 0 and 1, got {holdout}.")
    held = math.floor(n_segments * holdout)
    if held < MIN_VALIDATION_SEGMENTS:
        needed = math.ceil(MIN_VALIDATION_SEGMENTS / holdout)
        raise UserError(f"The calibration has {n_segments} segment(s), too few to hold out a validation part "
                        f"of {MIN_VALIDATION_SEGMENTS} segments at {holdout:.0%}; use at least {needed} calibration "
                        f"segments or a larger validation share.")
    return held


def unit_settings_for(n_segments: int, bits: tuple[int, ...], seed: int) -> UnitSettings:
    """The unit calibration's settings, checked against the calibration size and the analysis's widths before any
    work (the command line and the Home page ask the same)."""
    settings = UnitSettings(seed=seed)
    validation_count(n_segments, settings.holdout)
    missing = sorted(set(settings.noise_bits) - set(bits))
    if missing:
        raise UserError(f"The unit calibration sizes its noise like each layer's RTN error at {missing} bits; add "
                        f"them to the widths (--bits, or the sweep's --candidates).")
    return settings


def validation_segments(segments: torch.Tensor, holdout: float) -> torch.Tensor:
    """The last `holdout` share of the calibration segments (validation_count of them)."""
    return segments[segments.shape[0] - validation_count(segments.shape[0], holdout):]


def noise_levels(layers: pd.DataFrame, errors: pd.DataFrame, noise_bits: tuple[int, ...]) -> pd.DataFrame:
    """(layers × levels) σ² per layer: err_layerwise(l, b) / trace_layerwise(l) (see the module docstring).

    (our choice) With errors for several group sizes the largest number's are used: the noise only needs a size.
    """
    if "group_size" in errors.columns:
        errors = errors[errors["group_size"] == errors["group_size"].max()]
    missing = sorted(set(noise_bits) - set(errors["bits"]))
    if missing:
        raise UserError(f"The analysis has no predicted errors at {missing} bits for the noise levels; choose noise "
                        f"widths among {sorted(set(errors['bits']))}.")
    by_bits = errors.pivot_table(index="layer", columns="bits", values="err_layerwise")
    trace = layers.set_index("layer")["trace_layerwise"]
    return by_bits[list(noise_bits)].div(trace, axis=0).loc[layers["layer"]]


def _check_tokens(layers: pd.DataFrame) -> None:
    """A layer that saw no calibration token (an expert nobody routed to) cannot be measured by its noise."""
    if "tokens" not in layers.columns:
        return
    empty = layers.loc[layers["tokens"].fillna(0) <= 0, "layer"]
    if len(empty):
        raise UserError(f"No calibration token reaches {empty.iloc[0]} ({len(empty)} layer(s) in all), so noise in it "
                        f"changes nothing measurable; calibrate on more or longer segments so that every layer gets "
                        f"tokens.")


def _segment_kls(loaded: LoadedModel, windows: torch.Tensor, reference: ReferenceStats, block: int,
                 inputs: torch.Tensor | None) -> np.ndarray:
    """Mean KL(reference ‖ model) of each validation segment. With `inputs` (the full-precision hidden states entering
    `block`, one per segment) the forward starts at that block: noise in it leaves the blocks before it unchanged."""
    kls = []
    start_at = nullcontext() if inputs is None else replayed_blocks(loaded.model, loaded.arch.blocks_path, block)
    with start_at as replay:
        for i in range(windows.shape[0]):
            if replay is not None:
                replay.hidden = inputs[i:i + 1].to(loaded.device)
            stats = ReferenceStats(reference.log_probs[i:i + 1], reference.token_ids[i:i + 1])
            kls.append(evaluate(loaded.model, windows[i:i + 1], reference=stats).kl_divergence)
    return np.array(kls)


def block_inputs(loaded: LoadedModel, windows: torch.Tensor,
                 blocks: set[int]) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Each of `blocks` in order with the full-precision hidden states entering it on `windows` (None for block 0:
    its forwards start at the embeddings anyway). (our choice) One walk over the validation segments, so that the
    forwards with noise in a block's layers start at that block: the same KL, for the cost of the blocks after it.
    The walk takes one segment at a time, as the noisy forwards do: batched, other matrix shapes round differently
    (1.6e-4 of a tiny model's KL with two threads). The model must be as loaded again whenever the next block is
    asked for."""
    if not blocks:
        return
    for step in BlockWalk(loaded.model, loaded.arch, windows, batch_size=1, stop=max(blocks, default=-1) + 1):
        if step.index in blocks:
            yield step.index, torch.cat([batch.hidden for batch in step.batches()]) if step.index > 0 else None


def measure_layer(loaded: LoadedModel, name: str, levels: np.ndarray, windows: torch.Tensor,
                  reference: ReferenceStats, seed: int, inputs: torch.Tensor | None = None) -> LayerUnit:
    """KL of noise at each σ² in `levels` injected into layer `name` alone; the weights are restored afterwards.
    `inputs`: the full-precision hidden states entering the layer's block (block > 0), to start each forward there."""
    start = time.perf_counter()
    layer = loaded.arch.layer(name)
    original = get_weight(loaded.model, layer).detach().clone()
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(original.shape, generator=generator, dtype=torch.float32)  # one draw for every level
    per_segment = []
    try:
        for noise_ms in levels:
            set_weight(loaded.model, layer, original.float() + math.sqrt(noise_ms) * direction.to(original.device))
            per_segment.append(_segment_kls(loaded, windows, reference, layer.block, inputs))
    finally:
        set_weight(loaded.model, layer, original)
    kl = np.stack(per_segment)  # levels × segments
    if not kl.any():
        raise UserError(f"Noise in {name} leaves every validation token's prediction unchanged (no validation token "
                        f"reaches it); hold out more calibration segments so that it gets tokens.")
    rates = (kl * levels[:, None]).sum(axis=0) / (levels ** 2).sum()  # least squares through the origin, per segment
    if rates.mean() < 0:
        warnings.warn(f"The KL of noise in {name} is below float resolution (fitted rate {rates.mean():.3g}); its "
                      f"rate is set to 0.", RuntimeWarning, stacklevel=2)
    return LayerUnit(name, tuple(float(v) for v in levels), tuple(float(v) for v in kl.mean(axis=1)),
                     max(float(rates.mean()), 0.0), float(rates.std(ddof=1) / math.sqrt(len(rates))),
                     time.perf_counter() - start)


def calibrate_unit(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, layers: pd.DataFrame,
                   errors: pd.DataFrame, settings: UnitSettings = UnitSettings(), store: Store | None = None,
                   progress: Progress = no_progress) -> pd.DataFrame:
    """Per layer of the analysis: noise_ms (per level), kl, kl_rate, kl_rate_se, seconds (see the module docstring).

    `layers`/`errors` are the analysis of `loaded` on `sampling`'s calibration segments (`layers.attrs` carries its
    key). Each measured layer is stored at once, so a repeat or an interrupted run (`Cancelled` from `progress`)
    continues where it stopped.
    """
    _check_tokens(layers)
    levels = noise_levels(layers, errors, settings.noise_bits)
    windows = validation_segments(calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling),
                                  settings.holdout)
    store = store or Store()
    unit_key = settings.key(layers.attrs["analysis_key"])
    done = set(analyses.load_units(store, unit_key)["layer"])
    todo = [name for name in layers["layer"] if name not in done]
    if todo:
        progress(0, len(todo), "reference log-probabilities on the validation segments")
        with torch.inference_mode():
            reference = reference_stats(loaded.model, windows)
    measured = 0
    for block, inputs in block_inputs(loaded, windows, {loaded.arch.layer(name).block for name in todo}):
        for name in (name for name in todo if loaded.arch.layer(name).block == block):
            position = int(np.flatnonzero(layers["layer"].to_numpy() == name)[0])
            unit = measure_layer(loaded, name, levels.loc[name].to_numpy(dtype=float), windows, reference,
                                 settings.seed + position, inputs)
            analyses.write_unit(store, unit_key, unit)
            measured += 1
            progress(measured, len(todo), f"{name}: KL per unit noise {unit.kl_rate:.4g}")
    return analyses.load_units(store, unit_key).set_index("layer").loc[layers["layer"]].reset_index()


def with_unit(layers: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    """The layers table with the measured `kl_rate` and `kl_rate_se` columns that the calibrated unit reads; its
    attrs say unit "calibrated", the unit sweeps then plan in (aptq.sweep.plan_points)."""
    measured = units.set_index("layer")[["kl_rate", "kl_rate_se"]]
    merged = layers.drop(columns=["kl_rate", "kl_rate_se"], errors="ignore").join(measured, on="layer")
    merged.attrs = layers.attrs | {"unit": "calibrated"}
    return merged


def widths_to_measure(candidates: tuple[int, ...], n_segments: int) -> tuple[int, ...]:
    """The candidate widths whose multiples `calibrate_widths` measures, checked against the calibration size before
    any work (the command line asks the same)."""
    validation_count(n_segments, WIDTH_HOLDOUT)
    return tuple(sorted({int(b) for b in candidates if b <= WIDEST_MEASURED} or {min(candidates)}))


def width_multiple_choices(stored: pd.DataFrame, unit: str, source: str,
                           group_size: int) -> dict[str, MeasuredMultiples]:
    """The multiples a plan in `unit` with `source`'s errors and groups of `group_size` may charge, one per quantizer
    that measured them at that group size (a load_widths table): a label naming the quantizer and the multiples → the
    multiples, with those of the other grids measured the same way."""
    rows = stored[(stored["unit"] == unit) & (stored["source"] == source)]
    choices = {}
    for family, grids in rows.groupby(rows["settings"].map(_family), sort=False):
        measured = pd.concat([measured_widths(grids, unit, source, how) for how in dict.fromkeys(grids["settings"])])
        multiples = multiples_of(measured, group_size)
        if not multiples.widths:
            continue
        label = f"measured with {json.loads(family)['method']}: {multiples.describe()}"
        choices[label if label not in choices else f"{label} ({family})"] = multiples
    return choices


def calibrate_widths(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, layers: pd.DataFrame,
                     errors: pd.DataFrame, settings: QuantizeSettings, widths: tuple[int, ...],
                     store: Store | None = None, progress: Progress = no_progress,
                     grids: tuple[int, ...] = ()) -> pd.DataFrame:
    """Per width and grid: unit, source, settings, bits, kl, predicted, seconds, group_size, multiple (see the module
    docstring); the grids are `settings.group_size` and `grids` (other group sizes, 0 = per channel, whose errors the
    analysis predicts). `layers`/`errors` are the analysis of `loaded` on `sampling`'s calibration segments, in the
    unit the plans use (`layers.attrs`); each measurement is stored once made, so a repeat is a cache hit and an
    interrupted run (`Cancelled` from `progress`) continues."""
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling)
    windows = validation_segments(segments, WIDTH_HOLDOUT)
    fitting = segments[:segments.shape[0] - windows.shape[0]]
    source = error_source_for(errors, settings.method).source
    unit = layers.attrs.get("unit", "heuristic")
    analysis = layers.attrs["analysis_key"]
    store = store or Store()
    hows = {group: width_settings(replace(settings, group_size=group))
            for group in dict.fromkeys((settings.group_size, *grids))}
    stored = analyses.load_widths(store, analysis)
    todo = [(bits, group) for group, how in hows.items() for bits in widths
            if bits not in set(measured_widths(stored, unit, source, how)["bits"])]
    plan_of = {bits: {name: bits for name in layers["layer"]} for bits in widths}
    # every prediction before any quantization: a grid the analysis has no errors for is refused in one sentence
    predicted = {(bits, group): summarize(Plan(plan_of[bits], AllocationRequest(
        float(bits), "uniform", (bits,), group_size=group, quantizer=source, unit=unit)), layers, errors)[
        PREDICTED_ERROR_ATTENTION] for bits, group in todo}
    reference = None
    for done, (bits, group) in enumerate(todo):
        grid_settings = replace(settings, group_size=group)
        plan = plan_of[bits]
        complete = check_plan(loaded.arch, plan, grid_settings)  # the layers outside the analysis stay full precision
        reference = reference or reference_stats(loaded.model, windows)
        start = time.perf_counter()
        run = digest(analysis, unit, source, hows[group], str(bits))  # its quantized blocks' directory, removed after
        grid = f"{bits} bits" + ("" if group == settings.group_size else f" in {grid_name(group)}")
        try:
            weights, _ = quantize_model(loaded, complete, grid_settings, fitting, run,
                                        lambda _d, _t, message: progress(done, len(todo), f"{grid}: {message}"))
            kl = evaluate(loaded.model, windows, reference=reference, device=settings.device,
                          weights=weights).kl_divergence
        finally:
            remove_checkpoints(run)
        expected = predicted[(bits, group)]
        measured_width_multiples({bits: (kl, expected)})  # refused before it is stored: every stored row is usable
        analyses.write_width(store, WidthCalibration(analysis, unit, source, hows[group], bits, kl, expected,
                                                     time.perf_counter() - start))
    if todo:
        progress(len(todo), len(todo), "width multiples measured")
    stored = analyses.load_widths(store, analysis)
    table = pd.concat([measured_widths(stored, unit, source, how) for how in hows.values()])
    return table[table["bits"].isin(widths)].reset_index(drop=True)


def multiples_of(widths: pd.DataFrame, group_size: int) -> MeasuredMultiples:
    """A calibrate_widths table as the multiples plans in groups of `group_size` charge: bits → multiple on that grid,
    group size → bits → multiple on the others."""
    return MeasuredMultiples({int(r.bits): float(r.multiple) for r in widths[widths["group_size"] == group_size]
                              .itertuples()},
                             {int(group): {int(r.bits): float(r.multiple) for r in grid.itertuples()}
                              for group, grid in widths[widths["group_size"] != group_size].groupby("group_size")})


def with_width_multiples(layers: pd.DataFrame, widths: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """The layers table whose attrs carry the measured multiples (a calibrate_widths table, `multiples_of`) that
    sweeps plan with (aptq.sweep.plan_points)."""
    multiples = multiples_of(widths, group_size)
    charged = layers.copy()
    charged.attrs = layers.attrs | {"width_multiples": multiples.widths, "grid_multiples": multiples.grids}
    return charged
