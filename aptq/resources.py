"""What loading and quantizing need of this machine, checked before any work starts: memory for the weights that
loading must convert, disk for a run's finished blocks. Too little is refused in one sentence that gives both sizes.

Safetensors weights already in the dtype asked for are memory-mapped: their pages come from disk as blocks use them,
so they need no memory up front (the disk holds them already); weights in another dtype are converted into memory
on loading, and PyTorch `.bin` files are read whole.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch

from aptq.errors import UserError

SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def readable_size(n_bytes: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    power = 0 if n_bytes < 1024 else min(int(math.log(n_bytes, 1024)), len(units) - 1)
    return f"{n_bytes:.0f} bytes" if power == 0 else f"{n_bytes / 1024 ** power:.1f} {units[power]}"


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers reads (the index's shards when there is an index), else the .bin files."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))


def _safetensors_tensors(path: Path) -> list[tuple[str, int]]:
    """(dtype name, elements) of each tensor, from the file's header alone; none for a file that is not safetensors
    (the loader then says what is wrong with it)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                return []
            header = json.loads(handle.read(length))
        return [(entry["dtype"], math.prod(entry["shape"])) for name, entry in header.items()
                if name != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError):
        return []


def converted_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Memory that loading the model in `dtype` fills up front: floating tensors stored in another dtype, converted
    (our choice: integer tensors are counted as mapped, as transformers leaves them as stored), and .bin files whole."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in _weight_files(directory):
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        total += sum(numel * element for stored, numel in _safetensors_tensors(path)
                     if SAFETENSORS_FLOATS.get(stored, dtype) != dtype)
    return total


def available_memory() -> int | None:
    """Bytes the system can still give this process (MemAvailable + SwapFree), None where /proc/meminfo is absent."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return None
    return sum(int(fields.get(name, "0 kB").split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))


def free_disk(directory: Path) -> int:
    """Free bytes on the file system that holds `directory` (or would hold it: its nearest existing parent)."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_memory_for_loading(directory: Path, dtype: torch.dtype) -> None:
    needed = converted_bytes(directory, dtype)
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(f"Loading {directory} in {str(dtype).removeprefix('torch.')} needs {readable_size(needed)} of "
                        f"memory for weights stored in another dtype (converted on loading), but only "
                        f"{readable_size(available)} is available; free memory, or store the weights in the dtype "
                        f"they are loaded in (then they are memory-mapped from disk).")


def check_disk_for_run(directory: Path, needed: int) -> None:
    free = free_disk(directory)
    if needed > free:
        raise UserError(f"Quantizing needs {readable_size(needed)} of disk under {directory} for the finished blocks, "
                        f"but only {readable_size(free)} is free; free space, or set APTQ_CACHE_DIR to a larger disk.")
