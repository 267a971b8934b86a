"""A plan (layer → bits) becomes a quantized model, measured against full precision, stored (docs/algorithms.md §7–9).

    run = run_plan(loaded, corpus, sampling, plan, QuantizeSettings(method="attention", group_size=64),
                   EvalSettings(seqlen=512, max_tokens=16384))

Methods:
  rtn        round-to-nearest with the clipping search (no calibration data)
  gptq       GPTQ on every layer with its layer-wise Hessian `H = 2/N Σ x xᵀ`
  attention  attention-aware GPTQ (aespa/BoA): value projection per KV head with `H_V` (with `value_rows`, also row
             by row with the out projection's row factor: `gptq_per_head` with `row_factors`); query and key
             projections row by row with the row-Hessian compensation (`gptq_rows`; G from each query's attention
             probabilities by default, `row_weights`); with `shrink`, v's and q/k's Hessians mixed with GPTQ's; with
             `mlp_rows`, gate and up too, through the down projection's row factor (`mlp_row_factor`); out
             projection, down projection (and without `mlp_rows` gate and up) with plain GPTQ
  aespa      the attention-aware GPTQ (or RTN) solution's rounding optimised under each layer's attention-wise
             objective (aptq.aespa)

Quantization is true-sequential: the walk goes block by block (aptq.capture), each block's Hessians are collected on
inputs that come from the already quantized blocks, the block is quantized, and its outputs are recomputed with the
quantized weights for the next block. One block sits on the compute device at a time.

Nothing is copied whole and the loaded model is never modified: each finished block's quantized weights are saved
under `CACHE_DIR/runs/<key>/` and swapped into the loaded model by reference only while they are needed (the block's
outputs for the next block, then evaluation and export), the original tensors put back afterwards. An interrupted run
resumes at the first unfinished block; the directory goes once the run's row is stored. Out of device memory, a block
is retried in smaller batches, then on the CPU, with a note. The run key covers the model, calibration, plan,
settings, evaluation and PIPELINE_VERSION, so the same plan is never quantized twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from aptq import coverage, resources, teaching, validate
from aptq.aespa import AespaOptions, layer_objective, optimise_rounding, out_row_factor
from aptq.allocate import PREDICTED_ERROR_ATTENTION, PREDICTED_ERRORS, weight_size
from aptq.blockwise import BlockRefinement, refine_block
from aptq.capture import BlockStep, BlockWalk, device_failures
from aptq.choices import ACT_ORDER_FROM, ATTENTION_SHRINK, FP_TARGETS, QUANTIZERS, ROW_WEIGHT_CHOICES, ROW_WEIGHTS
from aptq.data import (
    Corpus,
    Sampling,
    calibration_segments,
    digest,
    evaluation_windows,
    token_ids,
    tokenizer_fingerprint,
)
from aptq.errors import UserError
from aptq.evaluate import Evaluation, ReferenceStats, check_window, evaluate, reference_stats
from aptq.export import LayerGroups, PackedPlan, Provenance, check_formats, export_model, group_sizes, plan_files
from aptq.geometry import RmsNorm, output_norm_modules
from aptq.gptq import GPTQResult, gptq, gptq_per_head, gptq_rows, gptq_rows_shared
from aptq.hessian import BlockHessians, CollectOptions, HessianCollector
from aptq.models import (
    Architecture,
    LinearLayer,
    LoadedModel,
    block_weight,
    get_module,
    get_weight,
    model_fingerprint,
    set_weight,
    weight_dtype,
)
from aptq.paths import CACHE_DIR
from aptq.progress import Progress, no_progress
from aptq.quantizer import QuantConfig, rtn
from aptq.targets import MismatchMoments, full_precision_target
from aptq.widths import FULL_PRECISION, QUANT_WIDTHS

if TYPE_CHECKING:
    from aptq.history import RunRecord
    from aptq.store import Store
# (our choice) the store and the run history (DuckDB) are imported where a run is stored, so that quantizing alone
# (bench/gpu_check.sh, on a machine without DuckDB) needs neither.

# bump when a change alters quantized weights: stored runs then miss (2: fp16 scales, sym zero; 3: the row sketches
# spread over calibration sets above 8 segments, aptq.hessian.sketches_per_segment)
PIPELINE_VERSION = 3
RUN_CACHE = CACHE_DIR / "runs"
REFERENCE_CACHE = CACHE_DIR / "cache" / "reference"


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "attention"
    group_size: int = 64  # columns per scale/zero group; 0 = per output channel
    symmetric: bool = False
    # act-order (columns by decreasing diag H, static groups: docs/algorithms.md §7, §9) for the layers quantized to at
    # least this many bits: 2 every layer, None none. (our choice) a width rule, since act-order helped the
    # attention-aware quantizer at 3 bits and hurt it at 2 on held-out segments (bench/results/peers.md)
    act_order_from: int | None = ACT_ORDER_FROM
    clip_search: bool = True
    damp: float = 0.01
    # segments per forward pass (None: aptq.capture.default_batch_size): speed only, not part of the key; but each step
    # of the block refinement takes one batch, so with the refinement on a given batch size is in the key
    batch_size: int | None = None
    device: str | None = None  # compute device (default: the model's): not part of the key
    aespa: AespaOptions = AespaOptions()  # method "aespa" only: part of its key alone
    # BoA's row compensation for v through the out projection (docs/algorithms.md §8; off by default, measured in
    # bench/results/quantizer.md): in the key of the attention-aware methods only, and only when on, so that the runs
    # stored before it existed keep their keys
    value_rows: bool = False
    # BoA's row compensation for gate and up through the down projection (docs/algorithms.md §14; off by default,
    # measured in bench/results/quantizer.md): in the key as value_rows is
    mlp_rows: bool = False
    # (our choice) the share by which v's per-head Hessians and q/k's row Hessians are shrunk toward GPTQ's objective
    # (`shrunk_value_hessians`, `shrunk_row_hessians`): 0 the objectives as the papers give them, 1 plain GPTQ; in the
    # key as value_rows is
    shrink: float = ATTENTION_SHRINK
    # q/k's row Hessians from pair weights "uniform" or "attention" (aptq.hessian.CollectOptions.row_weights; our
    # choice, measured in bench/results/quantizer.md): in the key as value_rows is
    row_weights: str = ROW_WEIGHTS
    # (our choice, docs/algorithms.md §16) in blocks with post-norms (Gemma 2/3, OLMo 2), every layer's error as the
    # norm after the out (down) projection scales it (aptq.hessian.CollectOptions.output_norms); a model without
    # post-norms refuses it (`check_output_norms`), so the CLI and the Quantize page turn it on where the model has
    # them (`has_output_norms`; measured on validation windows). In the key as value_rows is
    output_norms: bool = False
    # (our choice, docs/algorithms.md §17) the share α of the full-precision-output objective in each layer's objective
    # (aptq.targets): 0 the layer's output on the quantized model's inputs (off: every run stored before it existed),
    # 1 the full-precision model's output; every method but RTN, in the key only when above 0
    fp_targets: float = FP_TARGETS
    # (our choice, docs/algorithms.md §18) the block's codes and scales refined on its output after the layer-wise
    # quantizer (aptq.blockwise); off by default; every method but RTN, in the key only when on
    block: BlockRefinement = BlockRefinement()
    # (layer, group size) of the layers whose group is not `group_size`, sorted by layer: a plan of (bits, group size)
    # candidates (aptq.allocate.Plan.layer_groups); in the key only when it names a layer
    layer_groups: LayerGroups = ()

    def __post_init__(self) -> None:
        validate.block_refinement(self.method, self.block.iterations)
        if any(group < 0 for _, group in self.layer_groups):
            raise UserError("A layer's group size must be 0 (per output channel) or positive.")
        if not 0 <= self.shrink <= 1:
            raise UserError(f"The shrinkage of the attention-aware Hessians must be from 0 to 1, got {self.shrink}.")
        if not 0 <= self.fp_targets <= 1:
            raise UserError(f"The share of the full-precision targets must be from 0 to 1, got {self.fp_targets}.")
        if self.row_weights not in ROW_WEIGHT_CHOICES:
            raise UserError(f"Unknown row weights {self.row_weights!r}; choose from {', '.join(ROW_WEIGHT_CHOICES)}.")
        if self.act_order_from is not None and self.act_order_from not in QUANT_WIDTHS:
            raise UserError(f"Act-order applies from a width of 2–8 bits, got {self.act_order_from}.")

    def act_order(self, bits: int) -> bool:
        """Whether a layer of this width walks its columns in act-order."""
        return self.act_order_from is not None and bits >= self.act_order_from

    @cached_property
    def group_of(self) -> Callable[[str], int]:
        """The group size of a layer by name (built once: it is asked for every layer)."""
        return group_sizes(self.group_size, self.layer_groups)

    def config(self, bits: int, layer: str | None = None) -> QuantConfig:
        """The grid of a layer of this width (of the named layer's group size; else the run's)."""
        return QuantConfig(bits, self.group_size if layer is None else self.group_of(layer), self.symmetric,
                           self.clip_search)

    def key_fields(self) -> dict:
        fields = asdict(self)
        del fields["device"], fields["act_order_from"]
        if not self.block.iterations or self.batch_size is None:
            del fields["batch_size"]
        # every layer or none: the boolean of the runs stored before the width rule existed
        fields["act_order"] = {None: False, 2: True}.get(self.act_order_from, self.act_order_from)
        if self.method != "aespa":
            del fields["aespa"]
        if fields["row_weights"] == "uniform":
            fields["row_weights"] = None  # the weights every run stored before the choice existed used
        for name in ("value_rows", "mlp_rows", "shrink", "row_weights", "output_norms"):
            if self.method not in ("attention", "aespa") or not fields[name]:
                del fields[name]
        if self.method == "rtn" or not self.fp_targets:
            del fields["fp_targets"]
        if not self.block.iterations:
            del fields["block"]
        if self.layer_groups:
            fields["layer_groups"] = dict(self.layer_groups)
        else:
            del fields["layer_groups"]
        return fields


@dataclass(frozen=True)
class EvalSettings:
    seqlen: int = 512
    max_tokens: int | None = 16384  # None: the whole evaluation split
    prompts: int = 0  # corpus prompts completed by both models and stored with the run (aptq.teaching)


def uniform_plan(arch: Architecture, bits: int) -> dict[str, int]:
    return {layer.name: int(bits) for layer in arch.layers}


def check_plan(arch: Architecture, plan: dict[str, int], settings: QuantizeSettings) -> dict[str, int]:
    """The plan completed with 16 (full precision) for every layer it does not name; one clear error otherwise."""
    if settings.method not in QUANTIZERS:
        raise UserError(f"Unknown method {settings.method!r}; choose one of {', '.join(QUANTIZERS)}.")
    if settings.method in ("attention", "aespa") and not arch.attention_aware:
        raise UserError(f"The attention-aware quantizer is unavailable for this model: "
                        f"{arch.attention_unavailable_reason}; use --method gptq (layer-wise GPTQ) or rtn.")
    if settings.group_size < 0:
        raise UserError(f"The group size must be 0 (per output channel) or positive, got {settings.group_size}.")
    names = {layer.name for layer in arch.layers}
    unknown = sorted(set(plan) - names)
    if unknown:
        raise UserError(f"The plan names {len(unknown)} layer(s) this model does not have, e.g. {unknown[0]!r}; "
                        f"layer names look like {arch.layers[0].name!r}.")
    bad = {name: bits for name, bits in plan.items() if int(bits) != FULL_PRECISION and not 2 <= int(bits) <= 8}
    if bad:
        name, bits = next(iter(bad.items()))
        raise UserError(f"{name} has {bits} bits; use 2–8, or 16 to keep a layer in full precision.")
    complete = {layer.name: int(plan.get(layer.name, FULL_PRECISION)) for layer in arch.layers}
    if all(bits == FULL_PRECISION for bits in complete.values()):
        raise UserError("The plan keeps every layer in full precision: there is nothing to quantize.")
    return complete


def has_output_norms(loaded: LoadedModel) -> bool:
    """Whether the model's blocks normalise their out and down projections' outputs (Gemma 2/3, OLMo 2)."""
    return bool(output_norm_modules(loaded.model.get_submodule(f"{loaded.arch.blocks_path}.0")))


def check_output_norms(loaded: LoadedModel, settings: QuantizeSettings) -> None:
    """The post-norm weighting asked of a model without post-norms would change nothing: one sentence instead."""
    if settings.output_norms and settings.method in ("attention", "aespa") and not has_output_norms(loaded):
        raise UserError(f"This {loaded.arch.family} model does not normalise its out and down projections' "
                        f"outputs (no post-norms, as Gemma 2/3 and OLMo 2 have); use --output-norms off or auto.")


def layer_table(loaded: LoadedModel) -> pd.DataFrame:
    """layer, kind, n_params, d_in of every quantizable layer, read from the weights (no analysis needed)."""
    rows = []
    for layer in loaded.arch.layers:
        d_out, d_in = get_weight(loaded.model, layer).shape
        rows.append({"layer": layer.name, "kind": layer.kind, "n_params": d_out * d_in, "d_in": d_in})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Quantizing one layer


def quantize_layer(weight: torch.Tensor, layer: LinearLayer, hessians: BlockHessians | None, config: QuantConfig,
                   settings: QuantizeSettings, out_weight: torch.Tensor | None = None,
                   down_weight: torch.Tensor | None = None, mismatch: torch.Tensor | None = None,
                   shared: GPTQResult | None = None) -> tuple[torch.Tensor, str | None]:
    """The layer's dequantized weights under the settings' method, and a fallback message if GPTQ fell back.
    `out_weight`: the block's full-precision out projection (the value projection's row factors); `down_weight`: its
    down projection (gate's and up's row factors, with `mlp_rows`); `mismatch`: the layer's mismatch moment D of its
    full-precision and quantized inputs, to fit the full-precision output (aptq.targets); `shared`: the layer's
    attention-aware result (float32) on the weight it fits, from a walk shared with other layers (`shared_row_walks`).
    """
    if mismatch is not None:
        target = objective_weight(weight, layer, hessians, settings, mismatch)
        quantized, fallback = quantize_layer(target, layer, hessians, config, settings, out_weight, down_weight,
                                             shared=shared)
        return quantized.to(weight.dtype), fallback
    if settings.method == "aespa":
        starting = replace(settings, method=settings.aespa.start)  # in float32: exactly on its grid (bf16 is not)
        start, fallback = (shared.weight, shared.fallback) if shared is not None else \
            quantize_layer(weight.float(), layer, hessians, config, starting, out_weight, down_weight)
        objective = layer_objective(layer, weight, hessians, out_weight)
        return optimise_rounding(weight, start, objective, config, settings.aespa).weight, fallback
    if shared is not None:
        return shared.weight.to(weight.dtype), shared.fallback
    if settings.method == "rtn":
        return rtn(weight, config), None
    options = dict(act_order=settings.act_order(config.bits), damp=settings.damp, name=layer.name)
    # GPTQ's objective is the layer-wise H even where the attention-aware objectives' H̃ was collected (the analysis)
    h = (hessians.column(layer.name) if settings.method == "attention" else hessians.layerwise[layer.name]).to(
        weight.device)
    if settings.method == "attention" and layer.name in hessians.value:
        value = shrunk_value_hessians(hessians.value[layer.name].to(weight.device), h, settings.shrink)
        rows = _value_row_factors(layer, value, weight, out_weight) if settings.value_rows else None
        result = gptq_per_head(weight, value, config, row_factors=rows, **options)
    elif settings.method == "attention" and layer.name in hessians.row:
        G = shrunk_row_hessians(hessians.row[layer.name].to(weight.device), settings.shrink)
        result = gptq_rows(weight, h, G, config, **options)
    elif settings.method == "attention" and settings.mlp_rows and layer.name in hessians.mlp:
        if down_weight is None:
            raise ValueError(f"{layer.name} needs the down projection's weight for its row factor.")
        rows = mlp_row_factor(down_weight.to(weight.device), hessians.mlp[layer.name].to(weight.device))
        result = gptq_rows(weight, h, rows.unsqueeze(0), config, **options)  # one "head": all rows
    else:
        result = gptq(weight, h, config, **options)
    return result.weight, result.fallback


def objective_weight(weight: torch.Tensor, layer: LinearLayer, hessians: BlockHessians, settings: QuantizeSettings,
                     mismatch: torch.Tensor) -> torch.Tensor:
    """The weight the layer's objective fits: its full-precision target `W*` (aptq.targets), float32."""
    # H̃ for o/down under the post-norm weighting; v's target from its layer-wise H, whatever its objective
    column = hessians.column(layer.name) if settings.method in ("attention", "aespa") else \
        hessians.layerwise[layer.name]
    return full_precision_target(weight, mismatch, column, settings.damp, settings.fp_targets)


def shared_row_walks(model: torch.nn.Module, todo: list[tuple[LinearLayer, int]], hessians: BlockHessians | None,
                     settings: QuantizeSettings, mismatch: dict[str, torch.Tensor]) -> dict[str, GPTQResult]:
    """The attention-aware results of the block's query and key projections of one width, walked together
    (`gptq_rows_shared`: the same result as one walk each, in about half the time), by layer name; {} where the
    method's q/k are not BoA walks or no two layers share one."""
    walks = settings.method == "attention" or (settings.method == "aespa" and settings.aespa.start == "attention")
    if hessians is None or not walks:
        return {}
    together: dict[tuple[QuantConfig, str, int], list[LinearLayer]] = {}  # (grid, input, head size) → layers
    for layer, bits in todo:
        if layer.name in hessians.row:
            key = (settings.config(bits, layer.name), layer.input_group, hessians.row[layer.name].shape[-1])
            together.setdefault(key, []).append(layer)
    shared = {}
    for (config, _, _), layers in together.items():
        bits = config.bits
        if len(layers) < 2:
            continue
        fitted = []  # (the weight the layer's objective fits, its row Hessians)
        for layer in layers:
            weight = get_weight(model, layer).detach().float()
            if layer.name in mismatch:
                weight = objective_weight(weight, layer, hessians, settings, mismatch[layer.name])
            fitted.append((weight, shrunk_row_hessians(hessians.row[layer.name].to(weight.device), settings.shrink)))
        H = hessians.column(layers[0].name).to(fitted[0][0].device)  # one input: one H
        results = gptq_rows_shared(fitted, H, config, act_order=settings.act_order(bits),
                                   damp=settings.damp, name=" and ".join(layer.name for layer in layers))
        shared.update({layer.name: result for layer, result in zip(layers, results)})
    return shared


def shrunk_value_hessians(value: torch.Tensor, layerwise: torch.Tensor, share: float) -> torch.Tensor:
    """`(1 − s) H_V,g + s (tr H_V,g / tr H) H` per KV head g (our choice): a GPTQ walk that fits the `H_V,g` of a
    few calibration segments exactly raised v's error on held-out segments of Gemma 3 (bench/results/quantizer.md);
    shrinking toward the layer-wise H, scaled to each head's trace, trades that fit for stability. s = 0 returns the
    Hessians unchanged; s = 1 makes each head's objective GPTQ's.
    """
    if share == 0:
        return value
    traces = value.diagonal(dim1=-2, dim2=-1).sum(-1) / layerwise.diagonal().sum()
    return (1 - share) * value + share * traces[:, None, None] * layerwise.to(value.dtype)


def shrunk_row_hessians(row: torch.Tensor, share: float) -> torch.Tensor:
    """`(1 − s) G_h + s (tr G_h / d_h) I` per head h (our choice, as `shrunk_value_hessians`): s = 1 leaves the row
    compensation nothing to do (the rows of an identity G are independent), so q and k are quantized as by GPTQ."""
    if share == 0:
        return row
    head_dim = row.shape[-1]
    means = row.diagonal(dim1=-2, dim2=-1).mean(-1)
    identity = torch.eye(head_dim, dtype=row.dtype, device=row.device)
    return (1 - share) * row + share * means[:, None, None] * identity


def _value_row_factors(layer: LinearLayer, value: torch.Tensor, weight: torch.Tensor,
                       out_weight: torch.Tensor | None) -> torch.Tensor:
    """The value projection's row factors `Σ_{h∈g} W_O,hᵀ W_O,h` per KV head (aptq.aespa.out_row_factor)."""
    if out_weight is None:
        raise ValueError(f"The value projection {layer.name} needs the out projection's weight for its row factors.")
    return out_row_factor(out_weight.to(weight.device), value.shape[0], weight.shape[0] // value.shape[0])


def mlp_row_factor(down_weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """Gate's or up's row factor `R = W_downᵀ W_down ⊙ E[d dᵀ]` (d_out × d_out, float32 or wider): with the
    layer-wise H, the Kronecker approximation `R ⊗ H` of the Hessian `(2/N) Σ_t (W_downᵀ W_down ⊙ d_t d_tᵀ) ⊗ x_t x_tᵀ`
    of the MLP output's error, linearised at the calibration point (d_t: aptq.hessian, `mlp_rows`). (our choice) the
    token averages of d dᵀ and of x xᵀ taken apart, exact when d is the same for every token: the papers cover
    attention only; bench/results/quantizer.md measures it."""
    down = down_weight.to(torch.promote_types(down_weight.dtype, torch.float32))
    return (down.T @ down) * moments.to(down.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Quantizing the model


class _Checkpoints:
    """Quantized weights of finished blocks on disk: what lets an interrupted run resume."""

    def __init__(self, key: str) -> None:
        self.directory = RUN_CACHE / key

    def _path(self, block: int) -> Path:
        return self.directory / f"block-{block:04d}.safetensors"

    def load(self, block: int) -> tuple[dict[str, torch.Tensor], list[str]] | None:
        path = self._path(block)
        if not path.is_file():
            return None
        try:
            notes = json.loads(path.with_suffix(".json").read_text())
            return load_file(str(path)), notes
        except Exception:  # a torn file from a crash: quantize the block again
            return None

    def save(self, block: int, weights: dict[str, torch.Tensor], notes: list[str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(block)
        path.with_suffix(".json").write_text(json.dumps(notes))
        partial = path.with_suffix(".partial")
        save_file({name: w.detach().contiguous().cpu() for name, w in weights.items()}, str(partial))
        partial.replace(path)  # the weights file appears last and whole: its presence marks the block as done

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def finished(self) -> int:
        return len(list(self.directory.glob("block-*.safetensors")))

    def check_disk(self, model: torch.nn.Module, arch: Architecture, plan: dict[str, int]) -> None:
        """Refused before any work when the disk cannot hold the blocks still to quantize (weights in their dtype)."""
        weights = (get_weight(model, layer) for block in range(arch.n_blocks) if not self._path(block).is_file()
                   for layer, _ in _block_plan(arch, block, plan))
        needed = sum(weight.numel() * weight.element_size() for weight in weights)
        resources.check_disk_for_run(self.directory, needed)


def _block_plan(arch: Architecture, block: int, plan: dict[str, int]) -> list[tuple[LinearLayer, int]]:
    return [(layer, plan[layer.name]) for layer in arch.block_layers(block) if plan[layer.name] < FULL_PRECISION]


def _quantize_block(model: torch.nn.Module, todo: list[tuple[LinearLayer, int]], hessians: BlockHessians | None,
                    settings: QuantizeSettings, rtn_memo: dict | None = None, out_weight: torch.Tensor | None = None,
                    down_weight: torch.Tensor | None = None,
                    mismatch: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The block's quantized weights (the model is not modified) and the fallback notes; `mismatch`: D of the layers
    fitted to the full-precision output (aptq.targets)."""
    weights, notes = {}, []
    mismatch = mismatch or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallbacks are reported through the notes
        shared = shared_row_walks(model, todo, hessians, settings, mismatch)
    for layer, bits in todo:
        config = settings.config(bits, layer.name)
        memo_key = (layer.name, config)
        if rtn_memo is not None and memo_key in rtn_memo:
            quantized, fallback = rtn_memo[memo_key], None
        else:
            weight = get_weight(model, layer).detach()
            # the block refinement starts from the grid these weights lie on: in float32 they lie on it exactly (a
            # bfloat16 or float16 copy rounds them off it); _refine_step gives them the model's dtype after
            weight = weight.float() if settings.block.iterations else weight
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # fallbacks are reported through the notes
                quantized, fallback = quantize_layer(weight, layer, hessians, config, settings, out_weight,
                                                     down_weight, mismatch.get(layer.name), shared.get(layer.name))
            if rtn_memo is not None:
                rtn_memo[memo_key] = quantized
        weights[layer.name] = quantized
        notes += [fallback] if fallback and fallback not in notes else []  # a shared walk's: once
    return weights, notes


@contextmanager
def swapped_weights(model: torch.nn.Module, arch: Architecture, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named layers' weights replaced by `weights` for the duration, then the original tensors put back.

    Each module gets a new parameter on the module's device (a layer that is a row slice of a fused module fills its
    rows in a copy of that module's weight); the original parameter is only set aside, never written to."""
    layers = [arch.layer(name) for name in weights]
    # (module path, parameter name) → the original parameter (experts share one 3-D parameter per module)
    originals: dict[tuple[str, str], torch.nn.Parameter] = {}
    try:
        for layer in layers:
            module = get_module(model, layer.module_path)
            if (layer.module_path, layer.parameter) not in originals:
                original = getattr(module, layer.parameter)
                originals[(layer.module_path, layer.parameter)] = original
                setattr(module, layer.parameter, torch.nn.Parameter(original.detach().clone(), requires_grad=False))
            set_weight(model, layer, weights[layer.name])
        yield
    finally:
        for (path, parameter), original in originals.items():
            setattr(get_module(model, path), parameter, original)


@dataclass(frozen=True)
class QuantizedWeights:
    """A run's quantized weights, one file per block in its run directory (aptq.evaluate.BlockWeights)."""

    arch: Architecture
    checkpoints: _Checkpoints

    def block(self, block: int) -> dict[str, torch.Tensor]:
        stored = self.checkpoints.load(block)
        return {} if stored is None else stored[0]

    def swapped(self, model: torch.nn.Module, block: int) -> AbstractContextManager[None]:
        return swapped_weights(model, self.arch, self.block(block))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with every quantized block swapped in, for the duration (e.g. to export it)."""
        with ExitStack() as stack:
            for block in range(self.arch.n_blocks):
                stack.enter_context(self.swapped(model, block))
            yield model


def _collect(step: BlockStep, arch: Architecture, options: CollectOptions, geometry_cache: dict, parts: int,
             moments: MismatchMoments | None = None) -> tuple[BlockHessians, dict[str, torch.Tensor] | None]:
    """The block's Hessians, each cached batch processed in up to `parts` pieces (outputs are recomputed later), and
    with `moments` the mismatch moments D from the same pass over the quantized stream (the full-precision stream's
    forwards run beside it with the collector's hooks paused)."""
    with HessianCollector(step, arch, options, geometry_cache) as collector:
        if moments is not None:
            mismatch = moments.collect(parts, collector.process, collector.paused)
        else:
            mismatch = None
            for batch in step.batches():
                for piece in step.split(batch, parts):
                    collector.process(piece)
    return collector.result(), mismatch


def _moments_collector(arch: Architecture, step: BlockStep, todo: list[tuple[LinearLayer, int]],
                       options: CollectOptions, settings: QuantizeSettings) -> MismatchMoments | None:
    """With `fp_targets` above 0, the moments' collector for the block's layers that fit the full-precision output
    (aptq.targets): every layer but the experts of a mixture; the out and down projections under the post-norm
    weighting (`options.output_norms`, a block with post-norms) weigh their tokens as their Hessian does."""
    layers = [layer for layer, _ in todo if layer.expert is None]
    if not settings.fp_targets or not layers:
        return None
    post_norms = output_norm_modules(step.block) if options.output_norms else {}
    normed = {layer.module_path: RmsNorm.of(post_norms[layer.kind]).eps for layer in layers
              if layer.kind in post_norms}
    return MismatchMoments(step, layers, f"{arch.blocks_path}.{step.index}.", normed)


def _quantize_step(loaded: LoadedModel, step: BlockStep, todo: list[tuple[LinearLayer, int]],
                   settings: QuantizeSettings, geometry_cache: dict,
                   progress: Progress) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hessians and quantization of one block, then its refinement where the settings ask for one. Out of device
    memory: the batches split in halves until single segments, then the block on the CPU (our choice of order: smaller
    batches keep the speed of the device)."""
    attention = settings.method in ("attention", "aespa")
    options = CollectOptions(attention=attention, probes=0, mlp_rows=attention and settings.mlp_rows,
                             row_weights=settings.row_weights, output_norms=attention and settings.output_norms)
    # The out projection serves aespa's value objective and v's row factors only (docs/algorithms.md §8, §13).
    needs_out = settings.method == "aespa" or (options.attention and settings.value_rows)
    out_weight = block_weight(loaded.model, loaded.arch, step.index, "o") if needs_out else None
    down_weight = block_weight(loaded.model, loaded.arch, step.index, "down") if options.mlp_rows else None
    parts, notes = 1, []
    while True:
        try:
            moments = _moments_collector(loaded.arch, step, todo, options, settings)
            hessians, mismatch = _collect(step, loaded.arch, options, geometry_cache, parts, moments)
            weights, block_notes = _quantize_block(loaded.model, todo, hessians, settings, None, out_weight,
                                                   down_weight, mismatch)
            break
        except torch.cuda.OutOfMemoryError:
            if step.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if parts < step.largest_batch:
                parts *= 2
                message = f"Out of device memory in block {step.index}: batches split in {parts}."
            else:
                step.move_to(torch.device("cpu"))
                message = f"Out of device memory in block {step.index}: it was quantized on the CPU."
            notes.append(message)
            progress(step.index, loaded.arch.n_blocks, message)
    del hessians, mismatch  # the refinement's activations need the room
    weights, refined_notes = _refine_step(loaded, step, todo, weights, settings, progress)
    return weights, notes + block_notes + refined_notes


def _refine_step(loaded: LoadedModel, step: BlockStep, todo: list[tuple[LinearLayer, int]],
                 weights: dict[str, torch.Tensor], settings: QuantizeSettings,
                 progress: Progress) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The block refinement (aptq.blockwise) of the quantized block (float32 weights, see _quantize_block), in the
    model's dtype, and its notes. Out of device memory: the refinement again on the CPU (smaller batches would not
    help: each of its steps takes one whole batch)."""
    configs = {layer.name: settings.config(bits, layer.name) for layer, bits in todo}
    notes: list[str] = []
    try:
        weights, refined = refine_block(step, loaded.model, loaded.arch, todo, weights, configs, settings.block,
                                        progress, loaded.arch.n_blocks)
    except torch.cuda.OutOfMemoryError:
        if step.device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        step.move_to(torch.device("cpu"))
        notes.append(f"Out of device memory in block {step.index}'s refinement: it was refined on the CPU.")
        progress(step.index, loaded.arch.n_blocks, notes[-1])
        weights, refined = refine_block(step, loaded.model, loaded.arch, todo, weights, configs, settings.block,
                                        progress, loaded.arch.n_blocks)
    dtypes = {layer.name: get_weight(loaded.model, layer).dtype for layer, _ in todo}
    return {name: weight.to(dtypes[name]) for name, weight in weights.items()}, notes + ([refined] if refined else [])


def quantize_model(loaded: LoadedModel, plan: dict[str, int], settings: QuantizeSettings,
                   segments: torch.Tensor | None, key: str, progress: Progress = no_progress,
                   rtn_memo: dict | None = None) -> tuple[QuantizedWeights, list[str]]:
    """The quantized weights (in the run directory) and the notes (fallbacks); see the module docstring.

    `rtn_memo` (RTN only): a dict shared by several calls on the same model, so that each (layer, width) is rounded
    once; RTN layers do not depend on each other, which makes this exact. Sweeps pass one."""
    arch = loaded.arch
    checkpoints = _Checkpoints(key)
    checkpoints.check_disk(loaded.model, arch, plan)
    notes: list[str] = []
    n_blocks = arch.n_blocks
    if settings.method == "rtn":  # no data needed: layer by layer
        for block in range(n_blocks):
            todo = _block_plan(arch, block, plan)
            if todo and checkpoints.load(block) is None:
                checkpoints.save(block, *_quantize_block(loaded.model, todo, None, settings, rtn_memo))
            notes += (checkpoints.load(block) or ({}, []))[1]
            progress(block + 1, n_blocks, f"block {block + 1}/{n_blocks}")
        return QuantizedWeights(arch, checkpoints), notes
    last = max(block for block in range(n_blocks) if _block_plan(arch, block, plan))
    # blocks after the last quantized one: no work; with fp_targets or the block refinement the full-precision
    # stream walks beside it
    walk = BlockWalk(loaded.model, arch, segments, device=settings.device or loaded.device,
                     batch_size=settings.batch_size, stop=last + 1,
                     reference=settings.fp_targets > 0 or settings.block.iterations > 0)
    geometry_cache: dict = {}
    with device_failures(walk, "quantization", checkpoints.finished):
        for step in walk:
            todo = _block_plan(arch, step.index, plan)
            stored = checkpoints.load(step.index)
            if stored is None and todo:
                stored = _quantize_step(loaded, step, todo, settings, geometry_cache, progress)
                checkpoints.save(step.index, *stored)
            if stored is not None:
                notes += stored[1]
                if step.index < last:
                    with swapped_weights(loaded.model, arch, stored[0]):
                        step.finish()  # true-sequential: the next block's inputs come from the quantized block
            progress(step.index + 1, n_blocks, f"block {step.index + 1}/{n_blocks}")
    return QuantizedWeights(arch, checkpoints), notes


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics, cached on disk per model and evaluation protocol


def _reference(loaded: LoadedModel, windows: torch.Tensor, identity: RunIdentity, progress: Progress) -> ReferenceStats:
    path = REFERENCE_CACHE / f"{'-'.join([identity.model, identity.evaluation, *_dtype_part(identity.dtype)])}.pt"
    if path.is_file():
        try:
            return ReferenceStats(**torch.load(path))
        except Exception:
            path.unlink()  # torn by a crash: recompute
    stats = reference_stats(loaded.model, windows, progress=progress, device=loaded.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # one per process: concurrent writers
    torch.save(asdict(stats), partial)
    partial.replace(path)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# The whole run, in steps: identify (checks, fingerprints, key), look up, reference, quantize, evaluate, record, export


def run_key(model_fp: str, calibration_fp: str | None, plan: dict[str, int], settings: QuantizeSettings,
            eval_fp: str, dtype: str = "float32") -> str:
    """The run's name in the store. The weights' dtype is part of it: a bfloat16 run rounds every weight (and its
    reference the model) differently from a float32 one. (our choice) float32, the CPU's dtype, adds nothing, so that
    runs stored before the dtype counted keep their keys."""
    from aptq import history

    return digest(model_fp, calibration_fp or "-", history.plan_json(plan),
                  json.dumps(settings.key_fields(), sort_keys=True), eval_fp, str(PIPELINE_VERSION),
                  *_dtype_part(dtype))


def _dtype_part(dtype: str) -> list[str]:
    return [] if dtype == "float32" else [dtype]


def _stage(progress: Progress, stage: str) -> Progress:
    return lambda done, total, message: progress(done, total, f"{stage}: {message}")


@dataclass(frozen=True)
class RunIdentity:
    """A checked plan and the fingerprints a run is measured from, known before any model work; `key` names the run
    in the store."""

    decided: dict[str, int]  # the layers the request names (its coverage)
    plan: dict[str, int]  # complete: every layer, 16 where the request names none
    model: str
    calibration: str | None  # None for RTN: no calibration data
    evaluation: str
    key: str
    dtype: str = "float32"  # the model's weights' (aptq.models.weight_dtype)


@dataclass(frozen=True)
class _Quantized:
    """What the quantize step made."""

    weights: QuantizedWeights
    notes: list[str]  # fallbacks
    seconds: float
    device: str


@dataclass(frozen=True)
class _Measured:
    """What the evaluate step measured."""

    evaluation: Evaluation
    fp_perplexity: float
    completions: list[teaching.Completion]


def run_plan(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, plan: dict[str, int],
             settings: QuantizeSettings = QuantizeSettings(), evaluation: EvalSettings = EvalSettings(),
             store: Store | None = None, progress: Progress = no_progress, plan_meta: dict | None = None,
             export_dir: Path | str | None = None, overwrite: bool = False, rtn_memo: dict | None = None,
             export_formats: tuple[str, ...] = ()) -> RunRecord:
    """Quantize with `plan`, evaluate against full precision, store and return the run (`cached` True when the same
    run was stored before and no model work was done). `plan_meta` may carry name, allocation, budget, analysis and
    the predicted errors (aptq.allocate.PREDICTED_ERRORS). With `export_dir`, the quantized model and its plan files
    are written there (refused if it exists, unless `overwrite`), and each of `export_formats` (aptq.export) beside
    them, after the evaluation. `rtn_memo`: see `quantize_model`. The layers `plan` names are its coverage
    (aptq.coverage), stored with the run."""
    from aptq import history
    from aptq.store import Store

    store = store or Store()
    meta = dict(plan_meta or {})
    identity = identify_run(loaded, corpus, sampling, plan, settings, evaluation)
    packed = PackedPlan(loaded.arch, identity.plan, settings.group_size, settings.symmetric, settings.layer_groups)
    target_dir = _export_target(loaded, packed, store.path, export_dir, overwrite, tuple(export_formats))
    stored = stored_run(store, identity, meta)
    if stored is not None and target_dir is None:
        progress(1, 1, "cached")
        return replace(stored, cached=True)
    cached = stored is not None  # then this call only exports: the stored metrics stand
    if cached:
        quantized = _quantize(loaded, corpus, sampling, settings, identity, progress, rtn_memo)
    else:
        stored, quantized = _measure(loaded, corpus, sampling, identity, settings, evaluation, progress, meta,
                                     rtn_memo)
        history.record_run(store, stored)
        stored = history.find_run(store, identity.key)
    if target_dir is not None:
        with quantized.weights.applied(loaded.model) as model:
            _export(loaded, model, packed, settings, meta, stored, target_dir, overwrite, tuple(export_formats))
        stored = replace(stored, export_dir=str(target_dir))
    remove_checkpoints(identity.key)
    if cached:
        progress(1, 1, "exported; metrics were already stored")
    return replace(stored, cached=cached)


def identify_run(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, plan: dict[str, int],
                 settings: QuantizeSettings, evaluation: EvalSettings) -> RunIdentity:
    """The plan checked against the model (one clear sentence before any work), then the run's fingerprints and key."""
    complete = check_plan(loaded.arch, plan, settings)
    check_output_norms(loaded, settings)
    check_window(loaded.model, evaluation.seqlen)
    if settings.method != "rtn":
        validate.within_context(sampling.seqlen, loaded.max_length, "A calibration segment")
    model_fp = model_fingerprint(loaded.path)
    tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)
    calibration_fp = None if settings.method == "rtn" else sampling.fingerprint(corpus, tokenizer_fp)
    eval_fp = digest(corpus.fingerprint, tokenizer_fp, str(evaluation.seqlen), str(evaluation.max_tokens))
    dtype = weight_dtype(loaded.model)
    return RunIdentity(dict(plan), complete, model_fp, calibration_fp, eval_fp,
                       run_key(model_fp, calibration_fp, complete, settings, eval_fp, dtype), dtype)


def _export_target(loaded: LoadedModel, packed: PackedPlan, store_path: Path, export_dir: Path | str | None,
                   overwrite: bool, export_formats: tuple[str, ...]) -> Path | None:
    """The checked export directory (not yet written), or None without one."""
    if export_formats and not export_dir:
        raise UserError("An export format needs an export directory (--export DIR).")
    if not export_dir:
        return None
    target_dir = validate.export_target(export_dir, overwrite, keep=(loaded.path, store_path))
    check_formats(loaded.model, packed, export_formats)
    return target_dir


def stored_run(store: Store, identity: RunIdentity, meta: dict) -> RunRecord | None:
    """The stored run of this identity, if any, given the prediction `meta` carries (the same plan predicted again,
    e.g. by a newer analysis)."""
    from aptq import history

    stored = history.find_run(store, identity.key)
    if stored is not None and meta.get(PREDICTED_ERROR_ATTENTION) is not None:
        return history.set_prediction(store, identity.key, meta)
    return stored


def run_weights(arch: Architecture, key: str) -> QuantizedWeights:
    """The quantized weights a run left in its run directory (`measure_run` keeps them until `remove_checkpoints`)."""
    return QuantizedWeights(arch, _Checkpoints(key))


def remove_checkpoints(key: str) -> None:
    """The run directory of a stored run (its finished blocks are no longer needed)."""
    _Checkpoints(key).remove()


def reference_for(loaded: LoadedModel, corpus: Corpus, evaluation: EvalSettings, identity: RunIdentity,
                  progress: Progress = no_progress) -> tuple[torch.Tensor, ReferenceStats]:
    """The evaluation windows and the full-precision model's statistics on them (cached on disk)."""
    windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), evaluation.seqlen,
                                 evaluation.max_tokens)
    return windows, _reference(loaded, windows, identity, progress)


def measure_run(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, identity: RunIdentity,
                settings: QuantizeSettings = QuantizeSettings(), evaluation: EvalSettings = EvalSettings(),
                progress: Progress = no_progress, plan_meta: dict | None = None, rtn_memo: dict | None = None
                ) -> RunRecord:
    """Quantize and evaluate without touching the store: the run's record, as `run_plan` stores it (its finished
    blocks stay in the run directory, which the caller removes once the record is stored). A Ray sweep's workers call
    this; only the driver writes the store (aptq.ray_sweep). A device out of memory or lost while evaluating is one
    sentence; nothing is stored and the quantized blocks stay, so running it again evaluates without quantizing."""
    return _measure(loaded, corpus, sampling, identity, settings, evaluation, progress, plan_meta, rtn_memo)[0]


def _measure(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, identity: RunIdentity,
             settings: QuantizeSettings, evaluation: EvalSettings, progress: Progress, plan_meta: dict | None,
             rtn_memo: dict | None) -> tuple[RunRecord, _Quantized]:
    """`measure_run`, with the quantized weights `run_plan` may export."""
    # The evaluation already runs one window at a time, so only another device or more free memory can help.
    failures = partial(device_failures, finished=_Checkpoints(identity.key).finished,
                       remedy="on the CPU (or with more free device memory)")
    with failures(loaded.device, "evaluation of the full-precision reference"):
        reference = reference_for(loaded, corpus, evaluation, identity, _stage(progress, "reference"))
    quantized = _quantize(loaded, corpus, sampling, settings, identity, progress, rtn_memo)
    with failures(quantized.device, "evaluation of the quantized model"):
        measured = _evaluate(loaded, corpus, reference, evaluation, quantized, progress)
    return _run_record(loaded, corpus.name, sampling, settings, identity, dict(plan_meta or {}), quantized,
                       measured), quantized


def _quantize(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, settings: QuantizeSettings,
              identity: RunIdentity, progress: Progress, rtn_memo: dict | None) -> _Quantized:
    segments = None if identity.calibration is None else calibration_segments(
        token_ids(loaded.tokenizer, corpus, "calibration"), sampling)
    start = time.perf_counter()
    weights, notes = quantize_model(loaded, identity.plan, settings, segments, identity.key,
                                    _stage(progress, "quantizing"), rtn_memo)
    return _Quantized(weights, notes, time.perf_counter() - start, settings.device or str(loaded.device))


def _evaluate(loaded: LoadedModel, corpus: Corpus, reference: tuple[torch.Tensor, ReferenceStats],
              evaluation: EvalSettings, quantized: _Quantized, progress: Progress) -> _Measured:
    """The quantized model against full precision on the evaluation windows, and the side-by-side completions."""
    windows, stats = reference
    result = evaluate(loaded.model, windows, reference=stats, progress=_stage(progress, "evaluating"),
                      device=quantized.device, weights=quantized.weights)
    completions = teaching.side_by_side(loaded.model, lambda: quantized.weights.applied(loaded.model),
                                        loaded.tokenizer, teaching.corpus_prompts(corpus, evaluation.prompts))
    return _Measured(result, float(np.exp(stats.mean_nll)), completions)


def _run_record(loaded: LoadedModel, corpus_name: str, sampling: Sampling, settings: QuantizeSettings,
                identity: RunIdentity, meta: dict, quantized: _Quantized, measured: _Measured) -> RunRecord:
    from aptq import history

    table = layer_table(loaded)
    groups = np.array([settings.group_of(layer.name) for layer in loaded.arch.layers])
    size = weight_size(table, np.array([identity.plan[layer.name] for layer in loaded.arch.layers]), groups)
    result = measured.evaluation
    sampled = {"samples": sampling.n_samples, "seqlen": sampling.seqlen, "seed": sampling.seed,
               **({"dtype": identity.dtype} if _dtype_part(identity.dtype) else {})}
    return history.RunRecord(
        key=identity.key, model=identity.model, model_name=loaded.display_name, corpus=corpus_name,
        eval_seqlen=result.seqlen, eval_tokens=result.tokens, calibration=identity.calibration,
        method=settings.method, group_size=settings.group_size, settings=json.dumps(settings.key_fields() | sampled),
        plan=history.plan_json(identity.plan), plan_key=history.plan_key(identity.model, identity.plan,
                                                                          settings.group_size, settings.layer_groups),
        plan_name=meta.get("name"), allocation=meta.get("allocation", "manual"), budget=meta.get("budget"),
        analysis=meta.get("analysis"), **size, **{name: meta.get(name) for name in PREDICTED_ERRORS},
        **history.predicted_with(meta),
        perplexity=result.perplexity, kl=result.kl_divergence, top1=result.top1_agreement,
        nll_se=result.nll_se, kl_se=result.kl_se, top1_se=result.top1_se, fp_perplexity=measured.fp_perplexity,
        quant_seconds=quantized.seconds, eval_seconds=result.seconds,
        device=quantized.device, notes=" ".join(quantized.notes) or None,
        **coverage.run_fields(loaded.arch, table, identity.decided, groups),
        completions=json.dumps([asdict(c) for c in measured.completions]) if measured.completions else None)


def _export(loaded: LoadedModel, model: torch.nn.Module, packed: PackedPlan, settings: QuantizeSettings, meta: dict,
            run: RunRecord, directory: Path, overwrite: bool, formats: tuple[str, ...]) -> None:
    """The quantized model, its plan files and formats, with the provenance of the stored run it came from."""
    files = plan_files(loaded.arch, model, packed.plan, settings.group_size, settings.symmetric,
                       meta | {"method": settings.method, "model": loaded.display_name}, settings.layer_groups)
    provenance = Provenance(loaded.display_name, settings.method, settings.key_fields(), run.analysis, packed.plan,
                            run.key, run.perplexity, run.kl, run.top1, run.fp_perplexity, run.corpus, run.eval_tokens,
                            run.eval_seqlen)
    export_model(model, loaded.tokenizer, directory, files, overwrite, packed, formats, provenance)
