"""Exports: the quantized model as an HF directory, and the plan as JSON, a GPTQModel `dynamic` block and an
llm-compressor recipe. Everything is written to a temporary sibling first and renamed, so nothing is half-written.

Production runtimes (compressed-tensors, vLLM kernels) need every layer's columns divisible by the group size; each
plan export says so and lists the layers where that does not hold.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from aptq.errors import UserError
from aptq.models import Architecture, get_weight
from aptq.widths import FULL_PRECISION

RUNTIME_NOTE = ("Production runtimes (compressed-tensors, vLLM kernels) need in_features % group_size == 0 for every "
                "quantized layer; layers listed under 'indivisible' do not meet that and need another group size.")


def module_bits(arch: Architecture, plan: dict[str, int]) -> dict[str, int]:
    """Bits per stored module (fused q/k/v share one module and one width; an expert's layers go by their
    per-expert names)."""
    bits: dict[str, int] = {}
    for layer in arch.layers:
        width = plan.get(layer.name, FULL_PRECISION)
        if bits.setdefault(layer.target, width) != width:
            raise UserError(f"Layers stored together in {layer.target} must share one bit width.")
    return bits


def indivisible_layers(arch: Architecture, model: nn.Module, plan: dict[str, int], group_size: int) -> list[str]:
    if group_size <= 0:
        return []
    return [layer.name for layer in arch.layers if plan.get(layer.name, FULL_PRECISION) < FULL_PRECISION
            and get_weight(model, layer).shape[1] % group_size]


def plan_document(arch: Architecture, model: nn.Module, plan: dict[str, int], group_size: int, symmetric: bool,
                  meta: dict) -> dict:
    return {"format": "aptq-plan/1", "group_size": group_size, "symmetric": symmetric, "meta": meta,
            "note": RUNTIME_NOTE, "indivisible": indivisible_layers(arch, model, plan, group_size),
            "layers": {layer.name: plan.get(layer.name, FULL_PRECISION) for layer in arch.layers}}


def _exact(module_path: str) -> str:
    return re.escape(module_path) + "$"


def gptqmodel_dynamic(arch: Architecture, plan: dict[str, int], group_size: int, symmetric: bool) -> dict:
    """A GPTQModel quantize config: the most common width as the base, per-module overrides in `dynamic`
    ("+:" regex = override, "-:" regex = keep in full precision)."""
    bits = module_bits(arch, plan)
    quantized = [b for b in bits.values() if b < FULL_PRECISION]
    if not quantized:
        raise UserError("The plan quantizes no layer; there is nothing to export for GPTQModel.")
    base = max(set(quantized), key=quantized.count)
    dynamic = {}
    for path, width in bits.items():
        if width >= FULL_PRECISION:
            dynamic[f"-:{_exact(path)}"] = {}
        elif width != base:
            dynamic[f"+:{_exact(path)}"] = {"bits": width, "group_size": group_size if group_size > 0 else -1}
    return {"bits": base, "group_size": group_size if group_size > 0 else -1, "sym": symmetric, "desc_act": False,
            "dynamic": dynamic, "_note": RUNTIME_NOTE}


def llmcompressor_recipe(arch: Architecture, plan: dict[str, int], group_size: int, symmetric: bool) -> str:
    """An llm-compressor recipe (YAML): one GPTQModifier config group per bit width, targeting modules by regex."""
    by_width: dict[int, list[str]] = defaultdict(list)
    for path, width in module_bits(arch, plan).items():
        by_width[width].append(path)
    strategy = {"strategy": "group", "group_size": group_size} if group_size > 0 else {"strategy": "channel"}
    groups = {f"group_{width}bit": {"targets": [f"re:{_exact(p)}" for p in paths],
                                    "weights": {"num_bits": width, "type": "int", "symmetric": symmetric,
                                                "dynamic": False} | strategy}
              for width, paths in sorted(by_width.items()) if width < FULL_PRECISION}
    ignore = ["lm_head"] + [f"re:{_exact(p)}" for p in by_width.get(FULL_PRECISION, [])]
    recipe = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"ignore": ignore, "config_groups": groups}}}}
    return f"# {RUNTIME_NOTE}\n" + yaml.safe_dump(recipe, sort_keys=False, width=120)


def _prepare(target: Path, overwrite: bool) -> Path:
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; choose another directory or pass --overwrite.")
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
               meta: dict) -> PlanFiles:
    return PlanFiles(plan_document(arch, model, plan, group_size, symmetric, meta),
                     gptqmodel_dynamic(arch, plan, group_size, symmetric),
                     llmcompressor_recipe(arch, plan, group_size, symmetric))


def write_plan_files(directory: Path, files: PlanFiles, overwrite: bool = False) -> Path:
    staging = _prepare(directory, overwrite)
    files.write_into(staging)
    _publish(staging, directory)
    return directory


def export_model(model: nn.Module, tokenizer, directory: Path, files: PlanFiles, overwrite: bool = False) -> Path:
    """The quantized model as dequantized safetensors that transformers loads as is, with the plan files beside it."""
    staging = _prepare(directory, overwrite)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    files.write_into(staging)
    _publish(staging, directory)
    return directory
