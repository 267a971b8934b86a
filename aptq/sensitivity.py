"""Per-layer sensitivity of a model on calibration data: traces, scores, predicted errors (docs/algorithms.md §2–5).

`analyze` walks the model block by block (aptq.capture), collects each block's Hessians (aptq.hessian), turns them into
one row per layer and one row per (layer, bit width), and writes them to the store one block at a time, so a repeat is
a cache hit and an interrupted analysis resumes at the first missing block.

Columns (a contract: the allocation solver reads `layers[layer, block, kind, fused, n_params, score]` and
`errors[layer, bits, err_layerwise, err_attention]`):

layers   layer, block, kind, fused (the name of the stored tensor a layer shares, else its own name), n_params,
         d_out, d_in,
         trace_layerwise   tr(I ⊗ H) = d_out · tr(H)
         trace_attention   v: Σ_g d_h · tr(H_V,g); q/k: Σ_h tr(G_h) · tr(H); o and down under a post-norm:
                           d_out · tr(H̃) (docs/algorithms.md §16); any other layer: = trace_layerwise
         trace_lm, trace_lm_se   APTQ tr(2 E[JᵀJ]) by Hutchinson, and its standard error
         score_layerwise, score_attention, score   the traces per parameter (score = APTQ trace / n_params)
         residual_ms       median per-token ‖h‖² of the residual stream the layer's module (attention or MLP) adds
                           its output to (aptq.allocate divides the errors by it)
         tokens            calibration tokens the layer's Hessian came from (an expert: those routed to it)
         pooled_hessian    an expert with too few routed tokens, given the pooled Hessian (aptq.experts)
Models without the attention-aware path (`arch.attention_unavailable_reason`): the attention columns repeat the
layer-wise ones (our choice: every solver keeps working; the CLI and the pages say the metric is unavailable).
errors   layer, bits, group_size (the setting's, then each of `extra_group_sizes`),
         err_layerwise     tr(ΔW H ΔWᵀ) with the error ΔW of round-to-nearest as `--method rtn` runs it
         err_attention     v: Σ_g tr(ΔW_g H_V,g ΔW_gᵀ); q/k: tr(G ΔW H ΔWᵀ); o and down under a post-norm:
                           tr(ΔW H̃ ΔWᵀ); any other layer: = err_layerwise
         err_gptq_layerwise, err_gptq_attention     the same two measures of the ΔW that GPTQ leaves
         err_aware_layerwise, err_aware_attention   … and of the ΔW of the attention-aware quantizer (gptq_per_head
                           with H_V for v, gptq_rows with G for q/k, GPTQ for o and the MLP, on H̃ for o and
                           down under a post-norm)
         The four quantizer columns are filled with `AnalysisSettings.quantizer_errors` (one GPTQ run per layer and
         width, twice for q/k/v), NaN otherwise. Every ΔW comes from the layer's full-precision weights and the
         Hessians of its full-precision inputs (our choice, as ExLlamaV2 measures its candidates: the analysis walks
         the unquantized model, so the errors of earlier layers do not enter).
The attention-aware Hessians are collected as the attention-aware quantizer collects them by default
(`analysis_options`): q/k's row Hessians from the attention pair weights, and the post-norm weighting where the model
has post-norms, so the attention measures and err_aware_* are those of the quantizer the product runs.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from aptq import validate
from aptq.allocate import check_group_sizes
from aptq.capture import BlockStep, BlockWalk, device_failures
from aptq.choices import ACT_ORDER_FROM, ROW_WEIGHTS
from aptq.data import Corpus, Sampling, calibration_segments, digest, token_ids, tokenizer_fingerprint
from aptq.errors import UserError
from aptq.gptq import GPTQResult
from aptq.hessian import DEFAULT_PROBES, BlockHessians, CollectOptions, HessianCollector
from aptq.models import Architecture, LinearLayer, LoadedModel, get_weight, model_fingerprint, weight_dtype
from aptq.progress import Progress, no_progress
from aptq.quantizer import QuantConfig, layer_error

if TYPE_CHECKING:  # (our choice) imported where results are stored: the per-block metrics run without DuckDB
    from aptq.pipeline import QuantizeSettings
    from aptq.store import Store

QUANTIZER_SOURCES = {"gptq": "gptq", "aware": "attention"}  # error-column infix → the quantizer that leaves it
# bump when any formula changes: old entries miss. 3: float16 scales, symmetric zero 2^(b−1); 4: the RTN errors are
# those of the RTN that runs (clipping on the squared error, no longer searched under H); 5: the residual stream
# after the attention add passes the attention output through the block's post-norm (Gemma 2/3, OLMo 2); 6: the
# attention-aware Hessians as the quantizer collects them (`analysis_options`: attention row weights, post-norms);
# 7: their row sketches spread over calibration sets above 8 segments (aptq.hessian.sketches_per_segment)
METHOD_VERSION = 7
DEFAULT_BITS = (2, 3, 4, 8)
ATTENTION_KINDS = ("q", "k", "v", "o")
CPU_CALIBRATION = (64, 512)  # (our choice) segments × tokens that keep an analysis within minutes on a CPU
GPU_CALIBRATION = (128, 2048)  # the GPTQ papers' setting


def default_calibration(device: torch.device | str) -> tuple[int, int]:
    return GPU_CALIBRATION if torch.device(device).type == "cuda" else CPU_CALIBRATION


def default_group_size(arch: Architecture) -> int:
    """128 (the common choice) when every layer's columns split into groups of 128, else 64 (our choice)."""
    return 128 if arch.hidden_size % 128 == 0 else 64


@dataclass(frozen=True)
class AnalysisSettings:
    group_size: int = 64  # columns per quantization group for the predicted errors; 0 = per output channel
    bits: tuple[int, ...] = DEFAULT_BITS
    probes: int = DEFAULT_PROBES  # Hutchinson probes per calibration segment
    symmetric: bool = False
    clip_search: bool = True
    max_blocks: int | None = None  # analyze only the first blocks (quick looks, tests)
    quantizer_errors: bool = False  # also the predicted errors of GPTQ and the attention-aware quantizer (costly)
    extra_group_sizes: tuple[int, ...] = ()  # more group sizes to predict errors for: (bits, group) candidates
    # the quantizer errors' column order, as the quantizer that will run walks them (QuantizeSettings.act_order_from)
    act_order_from: int | None = ACT_ORDER_FROM
    batch_size: int | None = None  # segments per forward pass; speed only, not part of the cache key
    device: str | None = None  # compute device (default: the model's); not part of the cache key

    def key_fields(self) -> dict:
        fields = asdict(self)
        del fields["batch_size"], fields["device"]
        fields["bits"] = sorted(set(self.bits))
        fields["extra_group_sizes"] = sorted(set(self.extra_group_sizes) - {self.group_size})
        if not self.quantizer_errors or self.act_order_from is None:  # only the quantizer errors depend on it
            del fields["act_order_from"]
        for name in ("quantizer_errors", "extra_group_sizes"):  # (our choice) absent when off: analyses stored
            if not fields[name]:  # before these settings existed keep their keys
                del fields[name]
        return fields

    @property
    def group_sizes(self) -> list[int]:
        """Every group size the predicted errors are computed for, the main one first."""
        return [self.group_size, *sorted(set(self.extra_group_sizes) - {self.group_size})]


@dataclass(frozen=True)
class Identity:
    """Fingerprints that key an analysis in the store."""

    key: str
    model: str
    calibration: str
    tokenizer: str
    settings_json: str


def identify(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, settings: AnalysisSettings) -> Identity:
    model_fp = model_fingerprint(loaded.path)
    tokenizer_fp = tokenizer_fingerprint(loaded.tokenizer)
    calibration_fp = sampling.fingerprint(corpus, tokenizer_fp)
    settings_json = json.dumps(settings.key_fields() | {"dtype": weight_dtype(loaded.model)}, sort_keys=True)
    return Identity(digest(model_fp, calibration_fp, settings_json, str(METHOD_VERSION)), model_fp,
                    calibration_fp, tokenizer_fp, settings_json)


def analysis_key(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, settings: AnalysisSettings) -> str:
    return identify(loaded, corpus, sampling, settings).key


# ---------------------------------------------------------------------------------------------------------------
# Per-block metrics


def _trace(matrix: torch.Tensor) -> float:
    return matrix.diagonal(dim1=-2, dim2=-1).sum().item()


def layer_rows(model: torch.nn.Module, arch: Architecture, hessians: BlockHessians,
               settings: AnalysisSettings) -> tuple[list[dict], list[dict]]:
    """The block's rows of `layers` and `errors` from its Hessians and current weights."""
    layers = arch.block_layers(hessians.block)
    layer_records = [_layer_record(get_weight(model, layer), layer, hessians, arch) for layer in layers]
    error_records = []
    for bits, group_size in itertools.product(sorted(set(settings.bits)), settings.group_sizes):
        config = QuantConfig(bits, group_size, symmetric=settings.symmetric, clip_search=settings.clip_search)
        # q and k of this width in one walk of the attention-aware quantizer, as the pipeline runs them; one width's
        # results held at a time
        shared = _shared_walks(model, arch, hessians, config, settings.act_order_from) \
            if settings.quantizer_errors else {}
        for layer in layers:
            weight = get_weight(model, layer).detach().float()
            h = hessians.layerwise[layer.name].to(weight.device)
            # One RTN ΔW per (layer, bits), scored under both Hessians: the pipeline's own RTN, as `--method rtn`
            # runs it (clipping on the plain squared error, no Hessian), so the prediction is the error of the run.
            quantized = {"": _quantized_by(weight, layer, hessians, config, "rtn")}
            if settings.quantizer_errors:
                quantized |= {f"{infix}_": _quantized_by(weight, layer, hessians, config, quantizer,
                                                         settings.act_order_from, shared.get(layer.name))
                              for infix, quantizer in QUANTIZER_SOURCES.items()}
            record = {"layer": layer.name, "bits": config.bits, "group_size": config.group_size}
            for prefix, q in quantized.items():
                record[f"err_{prefix}layerwise"] = float(layer_error(weight, q, h))
                record[f"err_{prefix}attention"] = _attention_error(weight, q, layer.name, hessians, arch, h,
                                                                    record[f"err_{prefix}layerwise"])
            error_records.append(record)
    return layer_records, error_records


def _layer_record(weight: torch.Tensor, layer: LinearLayer, hessians: BlockHessians, arch: Architecture) -> dict:
    """The layer's row of `layers`: its traces under each Hessian and their scores (`weight`: its shape and device)."""
    device = weight.device
    h = hessians.layerwise[layer.name].to(device)
    d_out, d_in = weight.shape
    n_params = d_out * d_in
    trace_layerwise = d_out * _trace(h)
    if layer.name in hessians.value:
        h_v = hessians.value[layer.name].to(device)
        trace_attention = arch.head_dim * _trace(h_v)
    elif layer.name in hessians.row:
        g = hessians.row[layer.name].to(device)
        trace_attention = _trace(g) * _trace(h)
    else:  # H̃ under a post-norm, else H (= trace_layerwise)
        trace_attention = d_out * _trace(hessians.column(layer.name).to(device))
    trace_lm = hessians.lm_trace[layer.name]
    module = "attention" if layer.kind in ATTENTION_KINDS else "mlp"
    # (our choice of normalization, HAWQ-style) scores are traces per parameter.
    return {
        "layer": layer.name, "block": layer.block, "kind": layer.kind, "fused": layer.fused_set,
        "n_params": n_params, "d_out": d_out, "d_in": d_in, "trace_layerwise": trace_layerwise,
        "trace_attention": trace_attention, "trace_lm": trace_lm, "trace_lm_se": hessians.lm_trace_se[layer.name],
        "score_layerwise": trace_layerwise / n_params, "score_attention": trace_attention / n_params,
        "score": trace_lm / n_params, "residual_ms": hessians.residual[module],
        "tokens": hessians.layer_tokens.get(layer.name, hessians.tokens),
        "pooled_hessian": layer.name in hessians.pooled}


def _attention_error(weight: torch.Tensor, quantized: torch.Tensor, name: str, hessians: BlockHessians,
                     arch: Architecture, h: torch.Tensor, layerwise: float) -> float:
    """v: Σ_g tr(ΔW_g H_V,g ΔW_gᵀ) over KV heads; q/k: tr(G ΔW H ΔWᵀ); o/down under a post-norm: tr(ΔW H̃ ΔWᵀ); any
    other layer: its `layerwise` error."""
    if name in hessians.value:
        h_v = hessians.value[name].to(weight.device)
        rows = arch.head_dim
        return float(sum(layer_error(weight[g * rows:(g + 1) * rows], quantized[g * rows:(g + 1) * rows], h_v[g])
                         for g in range(h_v.shape[0])))
    if name in hessians.row:
        return float(layer_error(weight, quantized, h, hessians.row[name].to(weight.device)))
    if name in hessians.output_normed:
        return float(layer_error(weight, quantized, hessians.output_normed[name].to(weight.device)))
    return layerwise


def _quantizer_settings(quantizer: str, config: QuantConfig, act_order_from: int | None) -> QuantizeSettings:
    """`aptq quantize --method quantizer`'s settings for this grid, with its default damping."""
    from aptq.pipeline import QuantizeSettings  # (our choice) here: the pipeline imports the store

    return QuantizeSettings(method=quantizer, group_size=config.group_size, symmetric=config.symmetric,
                            clip_search=config.clip_search, act_order_from=act_order_from)


def _shared_walks(model: torch.nn.Module, arch: Architecture, hessians: BlockHessians, config: QuantConfig,
                  act_order_from: int | None) -> dict[str, GPTQResult]:
    """The attention-aware quantizer's q and k of the block at this width, walked together
    (`pipeline.shared_row_walks`), by layer name."""
    from aptq.pipeline import shared_row_walks

    todo = [(layer, config.bits) for layer in arch.block_layers(hessians.block)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback to RTN is what that run would do too
        return shared_row_walks(model, todo, hessians, _quantizer_settings("attention", config, act_order_from), {})


def _quantized_by(weight: torch.Tensor, layer: LinearLayer, hessians: BlockHessians, config: QuantConfig,
                  quantizer: str, act_order_from: int | None = None,
                  shared: GPTQResult | None = None) -> torch.Tensor:
    """The layer's weights as `aptq quantize --method quantizer` leaves them, from these Hessians (the pipeline's own
    quantize_layer, in the given column order); `shared`: the attention-aware result of a walk shared with q or k."""
    from aptq.pipeline import quantize_layer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback to RTN is what that run would do too
        return quantize_layer(weight, layer, hessians, config, _quantizer_settings(quantizer, config, act_order_from),
                              shared=shared if quantizer == "attention" else None)[0]


def analysis_options(arch: Architecture, probes: int, seed: int) -> CollectOptions:
    """What the analysis collects: the attention-aware Hessians as the attention-aware quantizer collects them by
    default (q/k's rows from the attention pair weights; the post-norm weighting, which the collector applies exactly
    where a block has post-norms), so its predicted errors are those of that quantizer (our choice: a quantization
    with other row weights or without the weighting is predicted by these)."""
    return CollectOptions(attention=arch.attention_aware, probes=probes, seed=seed, row_weights=ROW_WEIGHTS,
                          output_norms=arch.attention_aware)


def collect_block(step: BlockStep, arch: Architecture, options: CollectOptions,
                  geometry_cache: dict) -> BlockHessians:
    """Run the step's batches through the collector, keeping the outputs as the next block's inputs."""
    with HessianCollector(step, arch, options, geometry_cache) as collector:
        for batch in step.batches():
            step.keep_output(batch, collector.process(batch))
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------
# Persistence


def _register(store: Store, loaded: LoadedModel, corpus: Corpus, sampling: Sampling, ident: Identity,
              n_blocks: int, device: torch.device, resume: bool, progress: Progress) -> set[int] | None:
    """Claim the analysis (aptq.analyses), first waiting for another process computing it; return the blocks already
    finished, or None when another process completed it meanwhile."""
    from aptq import analyses

    model = analyses.ModelRecord(ident.model, loaded.display_name, loaded.arch.family, loaded.source,
                                 loaded.baseline_label, loaded.n_params, loaded.arch.n_blocks)
    calibration = analyses.CalibrationRecord(ident.calibration, corpus.name, corpus.fingerprint, ident.tokenizer,
                                             sampling.n_samples, sampling.seqlen, sampling.seed)
    record = analyses.AnalysisRecord(ident.key, model, calibration, ident.settings_json, METHOD_VERSION, n_blocks)
    while True:
        try:
            return analyses.claim(store, record, str(device), resume)
        except analyses.Busy as busy:
            analyses.wait_while_running(store, ident.key, busy.owner, progress)
        if analyses.status(store, ident.key).status == "complete":
            return None
        resume = True  # the other process's finished blocks are reused


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


def analyze(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, settings: AnalysisSettings = AnalysisSettings(),
            store: Store | None = None, progress: Progress = no_progress,
            resume: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sensitivity of every linear layer; (layers, errors) as described in the module docstring.

    Cached in `store` (default: `Store()`): a repeat returns the stored frames without model work. With `resume`,
    blocks finished by an interrupted run are kept and the walk recomputes only the inputs up to the first missing
    one; without it, stored partial results are discarded. `progress(done, total, message)` is called once per
    block; raising `Cancelled` from it stops after the finished blocks are stored. `layers.attrs` carries
    `analysis_key` and `cached`.
    """
    if settings.probes < 1:
        raise UserError("The APTQ traces need at least 1 Hutchinson probe per segment.")
    try:
        for bits, group_size in itertools.product(settings.bits, settings.group_sizes):
            QuantConfig(bits, group_size)
    except ValueError as exc:
        raise UserError(f"Bad quantization setting: {exc}") from exc
    check_extra_group_sizes(loaded, settings)
    validate.within_context(sampling.seqlen, loaded.max_length, "A calibration segment")
    from aptq import analyses
    from aptq.store import Store

    store = store or Store()
    arch = loaded.arch
    n_blocks = arch.n_blocks if settings.max_blocks is None else validate.block_count(settings.max_blocks,
                                                                                      arch.n_blocks)
    ident = identify(loaded, corpus, sampling, settings)
    cached = analyses.load(store, ident.key)
    if cached is not None:
        progress(n_blocks, n_blocks, "cached")
        return _tagged(cached, ident.key, True)

    device = torch.device(settings.device) if settings.device else loaded.device
    # Drawn before anything is stored: a corpus too short for them must leave no 'running' analysis behind.
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling)
    walk = BlockWalk(loaded.model, arch, segments, device=device, batch_size=settings.batch_size, stop=n_blocks)
    options = analysis_options(arch, settings.probes, sampling.seed)
    position = {layer.name: i for i, layer in enumerate(arch.layers)}
    geometry_cache: dict = {}
    done = _register(store, loaded, corpus, sampling, ident, n_blocks, device, resume, progress)
    if done is None:
        return _tagged(analyses.load(store, ident.key), ident.key, True)
    final_status = "interrupted"
    try:  # from the claim on, the row ends 'complete' or 'interrupted', never 'running'
        progress(len(done), n_blocks, f"{len(done)} of {n_blocks} blocks already stored" if done else "starting")
        with device_failures(walk, "analysis", lambda: len(done)):
            for step in walk:
                if step.index in done:
                    continue  # the walk still computes its outputs: the next block needs them
                start = time.perf_counter()
                hessians = collect_block(step, arch, options, geometry_cache)
                layer_records, error_records = layer_rows(loaded.model, arch, hessians, settings)
                analyses.write_block(store, ident.key, step.index, layer_records, error_records,
                                     time.perf_counter() - start, position)
                done.add(step.index)
                progress(len(done), n_blocks, f"block {step.index + 1}/{n_blocks}")
        final_status = "complete"
    finally:
        analyses.finish(store, ident.key, final_status)
    return _tagged(analyses.load(store, ident.key), ident.key, False)


def check_extra_group_sizes(loaded: LoadedModel, settings: AnalysisSettings) -> None:
    """Extra group sizes exist for (bits, group size) candidates, which the allocation takes only where they split
    every layer's input columns: one that does not is refused before any work, with the allocation's own sentence
    (our choice: checked over every layer of the model, analysed or not)."""
    if settings.extra_group_sizes:
        from aptq.pipeline import layer_table  # as in _quantized_by: imported where it is needed

        check_group_sizes(layer_table(loaded), settings.extra_group_sizes)


def _tagged(frames: tuple[pd.DataFrame, pd.DataFrame], key: str, cached: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    layers, errors = frames
    layers.attrs.update(analysis_key=key, cached=cached)
    return layers, errors


def ranked(layers: pd.DataFrame, column: str = "score", n: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `n` most and `n` least sensitive layers under `column`."""
    ordered = layers.sort_values(column, ascending=False)
    return ordered.head(n), ordered.tail(n).iloc[::-1]
