"""Block-by-block walk over a decoder, keeping every block's inputs in memory.

The calibration segments (n × L token ids) go through the embeddings once, recording what the model hands to each of
its blocks (hidden states, attention mask, rotary position embeddings, position ids …, whatever the architecture
passes; some differ per block, as Gemma's sliding-window and full-attention layers' masks), and the forward pass
stops. From then on the walk runs one block at a time, in batches of a few segments: block i's outputs become block
i+1's inputs. Only the block being processed sits on the
compute device; the cached inputs stay on the CPU, so a model larger than the GPU streams through it.

Usage (the caller may inspect or modify each block before the walk computes its outputs):

    walk = BlockWalk(loaded.model, loaded.arch, segments, device="cuda")
    for step in walk:                       # step.index, step.block (already on the compute device)
        for batch in step.batches():        # batch.hidden and batch.kwargs are on the compute device
            out = step.forward(batch)       # runs the block on one batch (hooks installed by the caller fire)
            step.keep_output(batch, out)    # optional: use these as the next block's inputs
        ...                                 # e.g. quantize step.block in place
    # When the loop moves on, outputs not kept are computed with the block as it is then (so the next block sees the
    # modified block's outputs, as true-sequential quantization wants), and the block goes back to its home device.

With `reference=True` the walk also carries the full-precision model's stream: `step.reference` is a step over the
same block and batches whose inputs are the outputs of the unmodified earlier blocks (computed when the loop moves
on, with the block's original weights); the quantizer fits layers to it (aptq.targets).

Leaving the loop early (break, an exception, a `Cancelled` from a progress callback) puts the current block back too.
`device_failures` around the loop (or around other work on a device, such as an evaluation) turns a device that runs
out of memory or fails mid-walk into one sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aptq.errors import UserError
from aptq.models import Architecture

TOKENS_PER_BATCH = 4096  # (our choice) segments per forward pass = max(1, this // L): bounds activation memory


def default_batch_size(seqlen: int) -> int:
    return max(1, TOKENS_PER_BATCH // seqlen)


class _StopForward(Exception):
    """Raised once the last walked block's inputs are recorded: nothing after it needs to run."""


def _move(value: Any, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else unchanged. With `memo`, a tensor
    met again (one mask handed to every block) is moved once."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


def _rows(value: Any, size: int, start: int, stop: int) -> Any:
    """Tensors (also nested) whose first dimension is `size` cut to rows start … stop−1; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == size else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, size, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, size, start, stop) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Batch:
    index: int  # position in the walk's list of batches
    segments: range  # which calibration segments it holds
    hidden: torch.Tensor  # block input, on the compute device
    args: tuple  # further positional arguments of the block call (GPT-2 passes the mask positionally)
    kwargs: dict[str, Any]  # keyword arguments of the block call, on the compute device


class BlockStep:
    """One decoder block on the compute device with its cached inputs; see the module docstring."""

    def __init__(self, index: int, block: nn.Module, inputs: list[torch.Tensor], calls: dict[int, tuple[tuple, dict]],
                 batch_starts: list[int], device: torch.device) -> None:
        self.index = index
        self.block = block
        self.device = device
        self._inputs = inputs
        self._outputs: list[torch.Tensor | None] = [None] * len(inputs)
        self._batch_starts = batch_starts
        # The extra arguments depend only on the batch size (no padding): move each variant once per step.
        self._calls = {size: (_move(args, device), _move(kwargs, device)) for size, (args, kwargs) in calls.items()}
        self.reference: BlockStep | None = None  # the full-precision stream, in a walk with `reference`

    @property
    def n_batches(self) -> int:
        return len(self._inputs)

    @property
    def n_segments(self) -> int:
        return sum(hidden.shape[0] for hidden in self._inputs)

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a full-size batch (e.g. rotary `position_embeddings`), on the compute device."""
        return self._calls[max(self._calls)][1]

    def batch(self, index: int) -> Batch:
        hidden = self._inputs[index]
        args, kwargs = self._calls[hidden.shape[0]]
        start = self._batch_starts[index]
        return Batch(index, range(start, start + hidden.shape[0]), hidden.to(self.device), args, kwargs)

    def batches(self) -> Iterator[Batch]:
        for index in range(self.n_batches):
            yield self.batch(index)

    @property
    def largest_batch(self) -> int:
        return max(self._calls)

    def split(self, batch: Batch, parts: int) -> list[Batch]:
        """The batch as up to `parts` smaller ones (a device short of memory); their outputs are not for keeping.
        Extra arguments whose first dimension is the batch's size are sliced with it; others (broadcast) are kept."""
        size = batch.hidden.shape[0]
        step = -(-size // parts)
        if step >= size:
            return [batch]
        return [Batch(batch.index, batch.segments[lo:lo + step], batch.hidden[lo:lo + step],
                      _rows(batch.args, size, lo, lo + step), _rows(batch.kwargs, size, lo, lo + step))
                for lo in range(0, size, step)]

    def move_to(self, device: torch.device) -> None:
        """Continue this step on another device (e.g. the CPU when the accelerator runs out of memory)."""
        self.block.to(device)
        self.device = device
        self._calls = {size: _move(call, device) for size, call in self._calls.items()}
        if self.reference is not None:
            self.reference.move_to(device)

    def forward(self, batch: Batch) -> torch.Tensor:
        output = self.block(batch.hidden, *batch.args, **batch.kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output

    def keep_output(self, batch: Batch, output: torch.Tensor) -> None:
        self._outputs[batch.index] = output.detach().to(self._inputs[batch.index].device,
                                                        self._inputs[batch.index].dtype)

    @torch.no_grad()
    def finish(self) -> list[torch.Tensor]:
        """Outputs of every batch (computing those not kept), checked for NaN/inf: the next block's inputs."""
        for index, output in enumerate(self._outputs):
            if output is None:
                batch = self.batch(index)
                self.keep_output(batch, self.forward(batch))
        outputs = [o for o in self._outputs if o is not None]
        if not all(torch.isfinite(o).all() for o in outputs):
            raise UserError(f"Block {self.index} produced NaN or infinite activations on the calibration data; "
                            f"the model (or its dtype) is numerically unstable on this input.")
        return outputs


class BlockWalk:
    """Iterate over decoder blocks `start … stop-1` with each block's inputs cached; see the module docstring."""

    def __init__(self, model: nn.Module, arch: Architecture, segments: torch.Tensor,
                 device: torch.device | str | None = None, batch_size: int | None = None,
                 stop: int | None = None, storage: torch.device | str = "cpu", reference: bool = False) -> None:
        self.model = model
        self.arch = arch
        self.segments = segments
        self.blocks: nn.ModuleList = model.get_submodule(arch.blocks_path)
        self.device = torch.device(device) if device is not None else next(self.blocks.parameters()).device
        self.batch_size = batch_size or default_batch_size(segments.shape[1])
        self.stop = arch.n_blocks if stop is None else min(stop, arch.n_blocks)
        self.storage = torch.device(storage)
        self.batch_starts = list(range(0, segments.shape[0], self.batch_size))
        self.current: int | None = None  # the block being walked (None before the first)
        self.reference = reference  # also walk the full-precision stream (see the module docstring)

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts)

    @torch.no_grad()
    def _first_inputs(self) -> tuple[list[torch.Tensor], list[dict[int, tuple[tuple, dict]]]]:
        """Embeddings of every batch, and each walked block's other arguments per batch size.

        One forward per batch runs block 0 for real and replaces blocks 1 … stop−1 by recorders that pass their input
        through (in the structure block 0 returned), so every block's own arguments are recorded for the cost of one
        block; the last recorder stops the pass."""
        inputs: list[torch.Tensor] = []
        calls: list[dict[int, tuple[tuple, dict]]] = [{} for _ in range(self.stop)]
        memo: dict[int, torch.Tensor] = {}
        first_output: list[Any] = []

        def keep(index: int, args: tuple, kwargs: dict) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            size = hidden.shape[0]
            if size not in calls[index]:
                # Caches would accumulate state across calls; the walk never uses them.
                kwargs = {k: (None if k in ("past_key_values", "past_key_value") else v) for k, v in kwargs.items()}
                calls[index][size] = (_move(tuple(args[1:]), self.storage, memo), _move(kwargs, self.storage, memo))
            if index + 1 == self.stop:
                raise _StopForward
            return hidden

        def record_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(hidden.detach().to(self.storage))
            keep(0, args, dict(kwargs))

        def passthrough(index: int):
            def forward(*args, **kwargs):
                hidden = keep(index, args, kwargs)
                output = first_output[0]
                return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])
            return forward

        embed_device = self.model.get_input_embeddings().weight.device
        handles = [self.blocks[0].register_forward_pre_hook(record_first, with_kwargs=True),
                   self.blocks[0].register_forward_hook(lambda module, args, output: first_output.append(output))]
        for index in range(1, self.stop):
            self.blocks[index].forward = passthrough(index)
        try:
            for start in self.batch_starts:
                ids = self.segments[start:start + self.batch_size].to(embed_device)
                first_output.clear()
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            for index in range(1, self.stop):
                del self.blocks[index].forward  # the class's forward again
        return inputs, calls

    def __iter__(self) -> Iterator[BlockStep]:
        inputs, calls = self._first_inputs()
        reference_inputs = list(inputs) if self.reference else None  # both streams start at the embeddings
        for index in range(self.stop):
            self.current = index
            block = self.blocks[index]
            home = next(block.parameters()).device
            block.to(self.device)
            try:
                step = BlockStep(index, block, inputs, calls[index], self.batch_starts, self.device)
                if reference_inputs is not None:
                    step.reference = BlockStep(index, block, reference_inputs, calls[index], self.batch_starts,
                                               self.device)
                yield step
                if index + 1 < self.stop:  # the last block's outputs are not needed
                    inputs = step.finish()
                    if step.reference is not None:  # outside the caller's loop body: the block's own weights
                        reference_inputs = step.reference.finish()
            finally:
                block.to(home)


# A CPU allocation failure is a plain RuntimeError; this is the text of PyTorch's CPU allocator.
CPU_ALLOCATION_FAILURE = "can't allocate memory"


@contextmanager
def device_failures(where: BlockWalk | torch.device | str, work: str, finished: Callable[[], int],
                    remedy: str = "with a smaller batch size or on the CPU") -> Iterator[None]:
    """Around work on a device: a device out of memory or failing (lost, a driver error) becomes one sentence
    (UserError) that names the device and the work (`where` a walk: also the block it was at), says how many finished
    blocks (`finished()`) are kept, and how to continue (`remedy`, out of memory); the caller's own cleanup (a stored
    status, the run directory) has already run as the error passed."""
    try:
        yield
    except RuntimeError as exc:
        out_of_memory = isinstance(exc, torch.OutOfMemoryError) or CPU_ALLOCATION_FAILURE in str(exc)
        if not out_of_memory and not isinstance(exc, torch.AcceleratorError):
            raise
        walk = where if isinstance(where, BlockWalk) else None
        device = walk.device if walk is not None else torch.device(where)
        block = walk.current if walk is not None else None
        during = f"the {work} of block {block}" if block is not None else f"the {work}"
        kept = f"the {finished()} finished block(s) are kept"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if out_of_memory:
            raise UserError(f"The device {device} ran out of memory during {during} ({detail}); {kept}: run it "
                            f"again {remedy} to continue from there.") from exc
        raise UserError(f"The device {device} failed during {during} ({detail}); {kept}: run it again once the "
                        f"device works (or on the CPU) to continue from there.") from exc
