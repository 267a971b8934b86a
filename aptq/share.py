"""A dashboard view as URL parameters, so that a lecturer can share it: model, corpus, analysis settings and options,
solver, error source, unit, width multiples, budget and pins. Pins are written as `block.kind=bits` (short, and the
same for every model of a family)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd

from aptq.allocate import FULL_PRECISION, QUANT_WIDTHS


@dataclass(frozen=True)
class SharedView:
    model: str | None = None
    corpus: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    group: int | None = None  # the quantization group size (the link's key stays "group")
    blocks: int | None = None  # analysed blocks; None = all
    solver: str | None = None
    budget: float | None = None
    pins: str | None = None  # pins_to_text
    quantizer_errors: bool | None = None  # the analysis options of Home (aptq analyze --quantizer-errors, …)
    extra_groups: str | None = None  # groups_to_text
    calibrate: bool | None = None
    errors: str | None = None  # the allocation's error source (rtn, gptq, attention)
    unit: str | None = None  # the allocation's unit (heuristic, calibrated)
    multiples: str | None = None  # the allocation's measured width multiples, as the Bit budget page labels them

    def to_params(self) -> dict[str, str]:
        return {f.name: BOOL_TEXT[value] if isinstance(value, bool) else str(value)
                for f in fields(self) if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> SharedView:
        """The view in `params`; a value that does not parse is left out (an edited link opens what it can)."""
        values = {}
        for f in fields(cls):
            text = params.get(f.name)
            if text is None:
                continue
            kind = {"int | None": int, "float | None": float, "bool | None": parse_bool}.get(str(f.type), str)
            try:
                values[f.name] = kind(text)
            except ValueError:
                continue
        return cls(**values)


BOOL_TEXT = {True: "1", False: "0"}


def parse_bool(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"not 0 or 1: {text!r}")
    return text == "1"


def groups_to_text(groups: tuple[int, ...]) -> str | None:
    """Extra group sizes as "32,0" (0: per output channel); None for none, so that the URL leaves them out."""
    return ",".join(map(str, groups)) or None


def groups_from_text(text: str | None) -> tuple[int, ...]:
    """The sizes of groups_to_text, sorted; entries that are not whole numbers ≥ 0 are dropped (the analysis then
    checks that each divides the model's layers)."""
    groups = set()
    for part in (text or "").split(","):
        if part.strip().isdigit():
            groups.add(int(part))
    return tuple(sorted(groups))


def pins_to_text(pins: dict[str, int], layers: pd.DataFrame) -> str:
    """`{layer: bits}` as "block.kind=bits,…" in model order (layers: an analysis's layers table)."""
    where = layers.set_index("layer")[["block", "kind"]]
    return ",".join(f"{int(where.at[name, 'block'])}.{where.at[name, 'kind']}={int(pins[name])}"
                    for name in layers["layer"] if name in pins)


def pins_from_text(text: str, layers: pd.DataFrame) -> dict[str, int]:
    """The pins of pins_to_text; entries that do not parse, name no layer of `layers` or no width (2–8, 16) are
    dropped."""
    by_cell = {(int(row.block), str(row.kind)): str(row.layer) for row in layers.itertuples()}
    pins = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        cell, _, bits = item.partition("=")
        block, _, kind = cell.partition(".")
        try:
            name = by_cell.get((int(block), kind))
            width = int(bits)
        except ValueError:
            continue
        if name is not None and (width in QUANT_WIDTHS or width == FULL_PRECISION):
            pins[name] = width
    return pins

