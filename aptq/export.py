"""Exports: the quantized model as an HF directory (dequantized, for inspection), packed checkpoints that inference
engines load as they are (GPTQ, compressed-tensors `pack-quantized`), the plan as `llama-quantize` tensor-type
overrides, and the plan as JSON, a GPTQModel `dynamic` block and an llm-compressor recipe. Everything is written to a
temporary sibling first and renamed, so nothing is half-written.

Packed checkpoints hold our own codes: `recover_codes` reads them back exactly from the run's dequantized weights
(float16 scales, integer zero points), nothing is quantized again; for a bfloat16 or float16 model (the GPU default)
the codes' values round to the run's weights exactly. Their other tensors are float16.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from aptq import validate
from aptq.errors import UserError
from aptq.models import Architecture, LinearLayer, get_weight
from aptq.packing import WORD_BITS, pack_stream
from aptq.quantizer import GridCodes, QuantConfig, recover_codes
from aptq.widths import FULL_PRECISION

RUNTIME_NOTE = ("Production runtimes (compressed-tensors, vLLM kernels) need in_features % group_size == 0 for every "
                "quantized layer; layers listed under 'indivisible' do not meet that and need another group size.")


LayerGroups = tuple[tuple[str, int], ...]  # (layer, group size) where it is not the plan's (aptq.allocate pairs)


def group_sizes(group_size: int, layer_groups: LayerGroups = ()) -> Callable[[str], int]:
    """The group size of a layer by name: its own in `layer_groups`, else `group_size` (a partial, so that settings
    holding it still pickle, e.g. into Ray tasks)."""
    return partial(_group_of, dict(layer_groups), group_size)


def _group_of(own: dict[str, int], group_size: int, name: str) -> int:
    return own.get(name, group_size)


def module_specs(arch: Architecture, plan: dict[str, int],
                 group_of: Callable[[str], int]) -> dict[str, tuple[int, int]]:
    """(bits, group size) per stored module, the group 0 where it stays in full precision (fused q/k/v share one
    module and one grid; an expert's layers go by their per-expert names)."""
    specs: dict[str, tuple[int, int]] = {}
    for layer in arch.layers:
        width = plan.get(layer.name, FULL_PRECISION)
        spec = (width, group_of(layer.name) if width < FULL_PRECISION else 0)
        if specs.setdefault(layer.target, spec) != spec:
            raise UserError(f"Layers stored together in {layer.target} must share one bit width and group size.")
    return specs


def indivisible_layers(arch: Architecture, model: nn.Module, plan: dict[str, int],
                       group_of: Callable[[str], int]) -> list[str]:
    return [layer.name for layer in arch.layers if plan.get(layer.name, FULL_PRECISION) < FULL_PRECISION
            and group_of(layer.name) > 0 and get_weight(model, layer).shape[1] % group_of(layer.name)]


def plan_document(arch: Architecture, model: nn.Module, plan: dict[str, int], group_size: int, symmetric: bool,
                  meta: dict, layer_groups: LayerGroups = ()) -> dict:
    group_of = group_sizes(group_size, layer_groups)
    document = {"format": "aptq-plan/1", "group_size": group_size, "symmetric": symmetric, "meta": meta,
                "note": RUNTIME_NOTE, "indivisible": indivisible_layers(arch, model, plan, group_of),
                "layers": {layer.name: plan.get(layer.name, FULL_PRECISION) for layer in arch.layers}}
    return document | ({"group_sizes": dict(layer_groups)} if layer_groups else {})


def _exact(module_path: str) -> str:
    return re.escape(module_path) + "$"


def _gptq_group(group: int) -> int:
    return group if group > 0 else -1  # GPTQ's "per channel"


def _base_and_dynamic(arch: Architecture, plan: dict[str, int], group_of: Callable[[str], int]
                      ) -> tuple[tuple[int, int], dict]:
    """GPTQModel's per-module config: the most common (bits, group size) as the base, overrides in `dynamic` ("+:"
    regex = override, "-:" regex = keep in full precision)."""
    specs = module_specs(arch, plan, group_of)
    quantized = [spec for spec in specs.values() if spec[0] < FULL_PRECISION]
    if not quantized:
        raise UserError("The plan quantizes no layer; there is nothing to export for GPTQModel.")
    base = max(sorted(set(quantized)), key=quantized.count)
    dynamic = {}
    for path, (width, group) in specs.items():
        if width >= FULL_PRECISION:
            dynamic[f"-:{_exact(path)}"] = {}
        elif (width, group) != base:
            dynamic[f"+:{_exact(path)}"] = {"bits": width, "group_size": _gptq_group(group)}
    return base, dynamic


def gptqmodel_dynamic(arch: Architecture, plan: dict[str, int], group_size: int, symmetric: bool,
                      layer_groups: LayerGroups = ()) -> dict:
    """A GPTQModel quantize config for quantizing again with GPTQModel (see `_base_and_dynamic`)."""
    (bits, group), dynamic = _base_and_dynamic(arch, plan, group_sizes(group_size, layer_groups))
    return {"bits": bits, "group_size": _gptq_group(group), "sym": symmetric, "desc_act": False,
            "dynamic": dynamic, "_note": RUNTIME_NOTE}


def _config_groups(arch: Architecture, plan: dict[str, int], group_of: Callable[[str], int], symmetric: bool
                   ) -> tuple[dict[str, dict], list[str]]:
    """compressed-tensors config groups (one per width, or per width and group size when the plan mixes group sizes;
    modules by exact-name regex) and the ignore list."""
    by_spec: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path, spec in module_specs(arch, plan, group_of).items():
        by_spec[spec].append(path)
    quantized = sorted(spec for spec in by_spec if spec[0] < FULL_PRECISION)
    mixed = len({group for _, group in quantized}) > 1
    groups = {}
    for width, group in quantized:
        strategy = {"strategy": "group", "group_size": group} if group > 0 else {"strategy": "channel"}
        name = f"group_{width}bit" + (f"_{'g' + str(group) if group else 'channel'}" if mixed else "")
        groups[name] = {"targets": [f"re:{_exact(p)}" for p in by_spec[(width, group)]],
                        "weights": {"num_bits": width, "type": "int", "symmetric": symmetric,
                                    "dynamic": False} | strategy}
    return groups, ["lm_head"] + [f"re:{_exact(p)}" for p in by_spec.get((FULL_PRECISION, 0), [])]


def llmcompressor_recipe(arch: Architecture, plan: dict[str, int], group_size: int, symmetric: bool,
                         layer_groups: LayerGroups = ()) -> str:
    """An llm-compressor recipe (YAML) for quantizing again: one GPTQModifier config group per bit width (and group
    size)."""
    groups, ignore = _config_groups(arch, plan, group_sizes(group_size, layer_groups), symmetric)
    recipe = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"ignore": ignore, "config_groups": groups}}}}
    return f"# {RUNTIME_NOTE}\n" + yaml.safe_dump(recipe, sort_keys=False, width=120)


def _prepare(target: Path, overwrite: bool) -> Path:
    validate.export_target(target, overwrite)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


@dataclass(frozen=True)
class PlanFiles:
    """The plan in every format we write: our JSON, GPTQModel's quantize config, llm-compressor's recipe."""

    document: dict
    gptqmodel: dict
    recipe: str

    def write_into(self, directory: Path) -> None:
        (directory / "plan.json").write_text(json.dumps(self.document, indent=2))
        (directory / "gptqmodel_quantize_config.json").write_text(json.dumps(self.gptqmodel, indent=2))
        (directory / "llmcompressor_recipe.yaml").write_text(self.recipe)


def plan_files(arch: Architecture, model: nn.Module, plan: dict[str, int], group_size: int, symmetric: bool,
               meta: dict, layer_groups: LayerGroups = ()) -> PlanFiles:
    return PlanFiles(plan_document(arch, model, plan, group_size, symmetric, meta, layer_groups),
                     gptqmodel_dynamic(arch, plan, group_size, symmetric, layer_groups),
                     llmcompressor_recipe(arch, plan, group_size, symmetric, layer_groups))


def write_plan_files(directory: Path, files: PlanFiles, overwrite: bool = False) -> Path:
    staging = _prepare(directory, overwrite)
    files.write_into(staging)
    _publish(staging, directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Packed checkpoints and llama.cpp overrides

GPTQ = "gptq"
COMPRESSED_TENSORS = "compressed-tensors"
LLAMA_CPP = "llama.cpp"
EXPORT_FORMATS = (GPTQ, COMPRESSED_TENSORS, LLAMA_CPP)
PACKED_FORMATS = (GPTQ, COMPRESSED_TENSORS)
GPTQ_BITS = (2, 3, 4, 8)  # the widths GPTQ's word layout defines (5–7 exist only in GPTQModel's planar variant)
# Nearest llama.cpp k-quant per width (our choice: 7 bits rounds up to Q8_0, there is no 7-bit type).
LLAMA_CPP_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 7: "q8_0", 8: "q8_0", 16: "f16"}
LLAMA_CPP_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
                   "up": "ffn_up", "down": "ffn_down"}
K_QUANT_BLOCK = 256  # k-quants need rows of a multiple of 256 weights
LLAMA_CPP_NOTE = ("These overrides carry over the plan's widths only: llama-quantize rounds the FP16 model again with "
                  "its own k-quant grids (super-blocks of 256 weights with 6- or 8-bit sub-block scales, its own "
                  "rounding and no GPTQ/BoA error compensation), so the codes, scales and the measured perplexity of "
                  "this run do not carry over; a k-quant also costs more bits than its name (Q4_K ≈ 4.5, Q3_K ≈ 3.4, "
                  "Q2_K ≈ 2.6 bits per weight). Tensors whose rows are not a multiple of 256 cannot hold a k-quant, "
                  "and llama-quantize falls back to another type for them (it prints which; listed under "
                  "'k_quant_fallback').")
GPTQMODEL_DTYPE_NOTE = ("GPTQModel picks bfloat16 on the CPU unless told otherwise, which rounds these float16 scales "
                        "to 8 significant bits and computes in bfloat16 (+0.5 % perplexity on a 4-bit SmolLM2-135M); "
                        "load with dtype=torch.float16 to keep the scales as stored (bench/results/export.md).")
VLLM_NOTE = ("vLLM fuses q/k/v and gate/up into one matrix each and needs one width per fused matrix; blocks listed "
             "under 'unfusable' mix widths there and load in GPTQModel and transformers but not in vLLM.")


@dataclass(frozen=True)
class PackedPlan:
    """What packed formats need besides the model: the plan and the grid it was quantized on."""

    arch: Architecture
    plan: dict[str, int]
    group_size: int
    symmetric: bool
    layer_groups: LayerGroups = ()

    @cached_property
    def group_of(self) -> Callable[[str], int]:
        """The group size of a layer by name (built once: it is asked for every layer)."""
        return group_sizes(self.group_size, self.layer_groups)

    def config(self, bits: int, layer: str) -> QuantConfig:
        return QuantConfig(bits, self.group_of(layer), self.symmetric)

    def quantized(self) -> list[tuple[LinearLayer, int]]:
        return [(layer, self.plan[layer.name]) for layer in self.arch.layers
                if self.plan.get(layer.name, FULL_PRECISION) < FULL_PRECISION]


def check_formats(model: nn.Module, packed: PackedPlan, formats: tuple[str, ...]) -> None:
    """One sentence, before any work, when a format cannot hold a layer of the plan (names the layer and the fix)."""
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise UserError(f"Unknown export format {unknown[0]!r}; choose from {', '.join(EXPORT_FORMATS)}.")
    for name in (f for f in formats if f in PACKED_FORMATS):
        for layer, bits in packed.quantized():
            _check_layer(name, layer, bits, tuple(get_weight(model, layer).shape), packed.group_of(layer.name))


def _check_layer(fmt: str, layer: LinearLayer, bits: int, shape: tuple[int, int], group_size: int) -> None:
    d_out, d_in = shape
    if layer.transposed or layer.rows is not None:
        raise UserError(f"{layer.name} is part of a fused Conv1D module, which the {fmt} export does not pack; "
                        f"export the dequantized model only (no --export-format).")
    if group_size and d_in % group_size:
        raise UserError(f"{layer.name} has {d_in} input columns, which groups of {group_size} do not divide, as the "
                        f"{fmt} format needs; choose a group size that divides {d_in} (or 0, per channel).")
    if fmt != GPTQ:
        return
    if bits not in GPTQ_BITS:
        raise UserError(f"{layer.name} has {bits} bits, which the GPTQ format cannot hold; give it one of "
                        f"{', '.join(map(str, GPTQ_BITS))} bits or export compressed-tensors instead.")
    for label, size in (("input columns", d_in), ("output rows", d_out)):
        if size % WORD_BITS:
            raise UserError(f"{layer.name} has {size} {label}, not a multiple of 32 as GPTQ's int32 packing needs; "
                            f"keep it in full precision (16) or export compressed-tensors instead.")


def layer_codes(model: nn.Module, packed: PackedPlan) -> dict[str, GridCodes]:
    """Our codes of every quantized layer, read back exactly from its dequantized weights (see `recover_codes`)."""
    codes = {}
    for layer, bits in packed.quantized():
        try:
            codes[layer.name] = recover_codes(get_weight(model, layer), packed.config(bits, layer.name))
        except ValueError as error:
            raise UserError(f"{layer.name} is not on its {bits}-bit grid ({error}); packed formats need the run's "
                            f"own weights, export the dequantized model only.") from None
    return codes


def _half_state(model: nn.Module, replaced: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors in float16 except the replaced weights; tied tensors once (the first name holds them)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in replaced or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = (tensor.half() if tensor.is_floating_point() else tensor).detach().contiguous().cpu()
    return state


def gptq_tensors(codes: GridCodes, version: int) -> dict[str, torch.Tensor]:
    """One layer in the GPTQ layout; version 1 stores every zero point minus one (the historical offset)."""
    zeros = codes.zeros.to(torch.int64) - (1 if version == 1 else 0)
    return {"qweight": pack_stream(codes.codes.T, codes.cfg.bits),
            "qzeros": pack_stream(zeros, codes.cfg.bits).T.contiguous(),
            "scales": codes.scales.T.contiguous(), "g_idx": codes.group_index()}


def compressed_tensors_tensors(codes: GridCodes) -> dict[str, torch.Tensor]:
    """One layer in compressed-tensors `pack-quantized`: the signed codes `q − 2^(b−1)` are stored offset by 2^(b−1),
    i.e. our unsigned codes; zero points likewise, packed along the output rows (asymmetric grids only)."""
    tensors = {"weight_packed": pack_stream(codes.codes.T, codes.cfg.bits).T.contiguous(),
               "weight_scale": codes.scales.contiguous(),
               "weight_shape": torch.tensor(codes.codes.shape, dtype=torch.int64)}
    if not codes.cfg.symmetric:
        tensors["weight_zero_point"] = pack_stream(codes.zeros, codes.cfg.bits)
    return tensors


def gptq_quantization_config(packed: PackedPlan, version: int) -> dict:
    """GPTQModel/transformers/vLLM `quantization_config` of the packed checkpoint (see `_base_and_dynamic`)."""
    (bits, group), dynamic = _base_and_dynamic(packed.arch, packed.plan, packed.group_of)
    return {"quant_method": "gptq", "bits": bits, "group_size": _gptq_group(group), "sym": packed.symmetric,
            "desc_act": False, "static_groups": False, "true_sequential": True, "lm_head": False,
            "pack_dtype": "int32", "checkpoint_format": "gptq" if version == 1 else "gptq_v2", "dynamic": dynamic,
            "meta": {"quantizer": ["aptq-studio"]}}


def compressed_tensors_quantization_config(packed: PackedPlan) -> dict:
    """compressed-tensors `quantization_config` of the packed checkpoint: one config group per width."""
    groups, ignore = _config_groups(packed.arch, packed.plan, packed.group_of, packed.symmetric)
    for group in groups.values():
        group |= {"input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def unfusable_blocks(packed: PackedPlan) -> list[int]:
    """Blocks whose q/k/v or gate/up widths differ (vLLM fuses each set into one matrix)."""
    widths: dict[tuple[int, str], set[int]] = defaultdict(set)
    for layer in packed.arch.layers:
        fused = "qkv" if layer.kind in ("q", "k", "v") else "gate_up" if layer.kind in ("gate", "up") else None
        if fused:
            widths[(layer.block, fused)].add(packed.plan.get(layer.name, FULL_PRECISION))
    return sorted({block for (block, _), bits in widths.items() if len(bits) > 1})


def _write_packed(directory: Path, model: nn.Module, tokenizer, packed: PackedPlan, codes: dict[str, GridCodes],
                  fmt: str) -> None:
    directory.mkdir()
    # (our choice) symmetric grids as GPTQ v1, which every runtime reads; asymmetric ones as v2 (zero points as they
    # are): v1 stores zero − 1, which cannot hold a zero point of 0, and GPTQModel refuses asymmetric v1 that it
    # did not write itself.
    version = 1 if packed.symmetric else 2
    quantized = packed.quantized()
    state = _half_state(model, {f"{layer.module_path}.weight" for layer, _ in quantized})
    for layer, _ in quantized:
        tensors = gptq_tensors(codes[layer.name], version) if fmt == GPTQ else \
            compressed_tensors_tensors(codes[layer.name])
        state |= {f"{layer.module_path}.{name}": tensor for name, tensor in tensors.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quantization = gptq_quantization_config(packed, version) if fmt == GPTQ else \
        compressed_tensors_quantization_config(packed)
    config = model.config.to_dict() | {"quantization_config": quantization, "dtype": "float16"}
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if fmt == GPTQ:  # GPTQModel also reads its own file
        (directory / "quantize_config.json").write_text(json.dumps(quantization, indent=2))
    tokenizer.save_pretrained(str(directory))
    notes = {"note": VLLM_NOTE, "unfusable": unfusable_blocks(packed)}
    if fmt == GPTQ:
        notes["gptqmodel_dtype"] = GPTQMODEL_DTYPE_NOTE
    if fmt == GPTQ and version == 2:
        notes["checkpoint_format"] = ("gptq_v2 (asymmetric grid: zero points stored as they are; GPTQ v1 stores "
                                      "zero − 1, which cannot hold 0). GPTQModel loads v2; for runtimes that read "
                                      "only v1, quantize with a symmetric grid.")
    (directory / "aptq_notes.json").write_text(json.dumps(notes, indent=2))


def llama_cpp_overrides(model: nn.Module, packed: PackedPlan) -> dict:
    """The plan as `llama-quantize --tensor-type-file` lines (GGUF tensor names) with the note on what they mean."""
    lines, fallback = [], []
    for layer in packed.arch.layers:
        if layer.rows is not None or layer.kind not in LLAMA_CPP_NAMES:
            continue
        kind = LLAMA_CPP_NAMES[layer.kind]
        width = packed.plan.get(layer.name, FULL_PRECISION)
        lines.append(rf"blk\.{layer.block}\.{kind}\.weight={LLAMA_CPP_TYPES[width]}")
        if LLAMA_CPP_TYPES[width].endswith("_k") and get_weight(model, layer).shape[1] % K_QUANT_BLOCK:
            fallback.append(f"blk.{layer.block}.{kind}.weight")
    base = LLAMA_CPP_TYPES[_base_and_dynamic(packed.arch, packed.plan, packed.group_of)[0][0]].upper()
    return {"lines": lines, "base_type": base, "k_quant_fallback": fallback, "note": LLAMA_CPP_NOTE,
            "command": f"llama-quantize --tensor-type-file tensor_types.txt model-f16.gguf model-aptq.gguf {base}"}


def _write_llama_cpp(directory: Path, model: nn.Module, packed: PackedPlan) -> None:
    directory.mkdir()
    overrides = llama_cpp_overrides(model, packed)
    (directory / "tensor_types.txt").write_text("\n".join(overrides.pop("lines")) + "\n")  # pattern=type lines only
    (directory / "llama_quantize.json").write_text(json.dumps(overrides, indent=2))


@dataclass(frozen=True)
class Provenance:
    """Where an export comes from: the plan, the method and settings, the analysis and the run's measurements."""

    model: str
    method: str
    settings: dict
    analysis: str | None
    plan: dict[str, int]
    run_key: str | None
    perplexity: float | None
    kl: float | None
    top1: float | None
    fp_perplexity: float | None
    corpus: str | None
    eval_tokens: int | None
    eval_seqlen: int | None


def export_model(model: nn.Module, tokenizer, directory: Path, files: PlanFiles, overwrite: bool = False,
                 packed: PackedPlan | None = None, formats: tuple[str, ...] = (),
                 provenance: Provenance | None = None) -> Path:
    """The quantized model as dequantized safetensors that transformers loads as is, with the plan files beside it;
    each format in `formats` in its own subdirectory (`gptq/`, `compressed-tensors/`, `llama.cpp/`); the provenance
    as `export.json`. Checks everything before writing anything."""
    if formats and packed is None:
        raise ValueError("Packed formats need the PackedPlan.")
    if formats:
        check_formats(model, packed, formats)
    validate.export_target(directory, overwrite)
    codes = layer_codes(model, packed) if set(formats) & set(PACKED_FORMATS) else {}
    staging = _prepare(directory, overwrite)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        files.write_into(staging)
        if provenance is not None:
            document = {"format": "aptq-export/1", "formats": list(formats)} | asdict(provenance)
            (staging / "export.json").write_text(json.dumps(document, indent=2))
        for fmt in formats:
            if fmt == LLAMA_CPP:
                _write_llama_cpp(staging / fmt, model, packed)
            else:
                _write_packed(staging / fmt, model, tokenizer, packed, codes, fmt)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Downloads

PART_LABELS = {"": "Dequantized HF model", GPTQ: "GPTQ checkpoint", COMPRESSED_TENSORS: "compressed-tensors checkpoint",
               LLAMA_CPP: "llama.cpp overrides"}


@dataclass(frozen=True)
class ExportPart:
    """One downloadable part of an export: the top-level files of the export ("") or one format's subdirectory."""

    directory: Path
    name: str

    @property
    def label(self) -> str:
        return PART_LABELS[self.name]

    @property
    def file_name(self) -> str:
        return f"{self.directory.name}{'-' + self.name if self.name else ''}.zip"

    def read(self) -> bytes:
        """The part's files as a zip (stored, not compressed: safetensors barely compress)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for file in sorted((self.directory / self.name).iterdir()):
                if file.is_file():
                    archive.write(file, file.name)
        return buffer.getvalue()


def export_parts(directory: Path) -> list[ExportPart]:
    """The parts an export directory holds, the dequantized model first."""
    return [ExportPart(directory, name) for name in PART_LABELS if (directory / name).is_dir()]
