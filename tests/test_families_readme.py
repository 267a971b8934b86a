"""The README's family table against the code: the families it lists, which of them have the attention-aware path,
and the config flags its rows name as taking a family off that path (ALiBi) or as refused (q/k LayerNorms).

The table is what a new user reads to decide whether their model works; these tests fail when a family is added to or
dropped from `SUPPORTED_FAMILIES` without its row, or when a row promises a path the adapter does not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aptq.capture import BlockWalk
from aptq.errors import UserError
from aptq.hessian import CollectOptions, HessianCollector
from aptq.models import ATTENTION_FAMILIES, ATTENTION_UNAVAILABLE_WITH, SUPPORTED_FAMILIES, architecture_of
from tests.tiny_models import tiny_config

README = Path(__file__).resolve().parent.parent / "README.md"
OTHER_DECODERS = "any other decoder"
# Optional q/k LayerNorms the README says are refused when the analysis reaches them: family → config flag.
QK_LAYERNORM_FLAGS = {"phi": "qk_layernorm", "stablelm": "qk_layernorm", "cohere": "use_qk_norm"}


@dataclass(frozen=True)
class FamilyRow:
    families: tuple[str, ...]
    attention_aware: str
    quantizers: str
    notes: str


def family_rows() -> list[FamilyRow]:
    """The rows of the first table under "## Supported models" (header and separator left out; the tables after it
    hold measurements)."""
    section = README.read_text().split("\n## Supported models\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start + 2:end]
    rows = []
    for line in table:
        first, attention, quantizers, notes = (cell.strip() for cell in line.strip().strip("|").split("|", 3))
        rows.append(FamilyRow(tuple(name.strip() for name in first.split(",")), attention, quantizers, notes))
    return rows


def row_of(family: str) -> FamilyRow:
    return next(row for row in family_rows() if family in row.families)


def test_the_table_lists_every_supported_family_once_and_then_every_other_decoder():
    named = [family for row in family_rows() for family in row.families]
    assert sorted(named) == sorted(SUPPORTED_FAMILIES + (OTHER_DECODERS,))
    assert family_rows()[-1].families == (OTHER_DECODERS,)


def test_each_row_promises_the_attention_aware_path_exactly_where_the_adapter_takes_it():
    for row in family_rows():
        known = row.families != (OTHER_DECODERS,)
        assert not known or set(row.families) <= ATTENTION_FAMILIES, row
        assert row.attention_aware.startswith("yes" if known else "no"), row
        assert ("attention-aware" in row.quantizers) == known, row


@pytest.mark.parametrize("family", sorted(ATTENTION_UNAVAILABLE_WITH))
def test_a_flag_that_takes_a_family_off_the_attention_path_is_named_in_its_row(family):
    flag, _ = ATTENTION_UNAVAILABLE_WITH[family]
    assert f"{flag}=True" in row_of(family).attention_aware
    config = tiny_config(family)
    setattr(config, flag, True)
    arch = architecture_of(config)
    assert not arch.attention_aware and arch.attention_unavailable_reason


@pytest.mark.parametrize("family", sorted(QK_LAYERNORM_FLAGS))
def test_the_refused_qk_layernorm_flags_are_named_in_their_rows(family):
    assert f"`{QK_LAYERNORM_FLAGS[family]}`" in row_of(family).attention_aware


def test_stablelm_with_its_per_head_qk_layernorm_is_refused_by_the_analysis():
    """The README's promise for StableLM's optional per-head LayerNorms (tests/test_attention_geometry.py covers Phi's
    and Cohere's): collecting block 0's attention Hessians stops with one sentence instead of a wrong G."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("stablelm")
    config.qk_layernorm = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    arch = architecture_of(config)
    ids = torch.randint(0, 5000, (2, 16), generator=torch.Generator().manual_seed(1))
    step = next(iter(BlockWalk(model, arch, ids, batch_size=2, stop=1)))
    with pytest.raises(UserError, match="StableLmLayerNormPerHead is not an RMS norm"):
        with HessianCollector(step, arch, CollectOptions(probes=0)) as collector:
            for batch in step.batches():
                collector.process(batch)
