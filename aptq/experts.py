"""Mixtures of experts: each expert's Hessians from the calibration tokens routed to it, and its APTQ traces.

transformers 5 keeps all experts of a block in one module with 3-D tensors (`gate_up_proj` E × 2f × d,
`down_proj` E × d × f) called as `experts(hidden_states, top_k_index, top_k_weights)`; the router beside it stays in
full precision (it is not a layer). While a block is collected, a forward hook on that module recomputes its output
expert by expert with the same arithmetic (`act(gate) · up → down`, times the routing weight, summed), checks it
against the module's own output, and hands it on in its place, so that:

- expert e's gate/up Hessian is `H = (2/N_e) Σ x xᵀ` over the N_e tokens routed to it, and its down Hessian the same
  over the inputs of its down projection: GPTQ's error of each linear at its own output (our choice: the routing
  weight, which scales the expert's output in the MoE sum, is left out of H, so an expert is measured like a
  dense layer);
- its APTQ traces are Hutchinson's per-segment ‖∂(uᵀF)/∂W_e‖², with the gradient w.r.t. the expert's own slice formed
  exactly from the gradients at its gate/up and down outputs (`Σ_t δ_t x_tᵀ` over the segment's routed tokens), as
  for every other layer (F: the MLP output).

Fallback (our choice): an expert that receives fewer routed tokens than its input width has a singular, noisy
Hessian; it gets the Hessian of all the block's MLP input tokens (gate/up) or of every expert's down input pooled
(down) instead, with a warning; `pooled` records which layers, and `tokens` how many tokens each expert saw.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from aptq.errors import UserError
from aptq.models import LinearLayer


class ExpertRecorder:
    """Per-expert input sums and trace tensors of one block's experts module; see the module docstring."""

    def __init__(self, layers: list[LinearLayer], block_prefix: str, cut: bool = True) -> None:
        self.layers = layers
        self.cut = cut  # detach the MLP's input while tracing, as the collector does for every module it cuts
        self.path = layers[0].module_path[len(block_prefix):]
        self.n_experts = 1 + max(layer.expert for layer in layers)
        self.tokens = [0] * self.n_experts
        self.all_tokens = 0
        self._input_sum: torch.Tensor | None = None  # Σ x xᵀ over all tokens entering the experts module
        self._gate_up: dict[int, torch.Tensor] = {}  # Σ x xᵀ over tokens routed to expert e
        self._down: dict[int, torch.Tensor] = {}  # Σ z zᵀ over expert e's down inputs
        # Per batch: expert → (token indices, gate/up input, gate/up output, down input, down output); and the output.
        self.routed: dict[int, tuple[torch.Tensor, ...]] = {}
        self.output: torch.Tensor | None = None

    @contextmanager
    def hooked(self, block: nn.Module) -> Iterator[None]:
        experts = block.get_submodule(self.path)
        # Cut the graph at the MLP's input (router and experts alike): each module is differentiated on its own.
        parent = block.get_submodule(self.path.rpartition(".")[0]) if "." in self.path else block
        handles = [experts.register_forward_hook(self._recompute, with_kwargs=True)]
        if self.cut:
            handles.append(parent.register_forward_pre_hook(self._cut))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _cut(module: nn.Module, args: tuple):
        if torch.is_grad_enabled() and args:
            return (args[0].detach().requires_grad_(), *args[1:])
        return None

    def _recompute(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
        if len(values) < 3 or not hasattr(module, "act_fn"):
            raise UserError(f"The experts module {self.path} is not called as experts(hidden_states, top_k_index, "
                            f"top_k_weights) with an act_fn, so its experts cannot be measured one by one.")
        hidden, index, weights = values[:3]
        total = torch.zeros_like(hidden)
        self.routed = {}
        for e in range(self.n_experts):
            token, slot = torch.where(index == e)
            x = hidden[token]
            gate_up = nn.functional.linear(x, module.gate_up_proj[e])
            gate, up = gate_up.chunk(2, dim=-1)
            z = module.act_fn(gate) * up
            y = nn.functional.linear(z, module.down_proj[e])
            total = total.index_add(0, token, (y * weights[token, slot, None]).to(total.dtype))
            self.routed[e] = (token, x, gate_up, z, y)
        tolerance = 16 * torch.finfo(output.dtype).eps  # the same arithmetic; only the summation order may differ
        scale = float(output.detach().abs().max())
        if not torch.allclose(total, output, rtol=tolerance, atol=tolerance * scale + 1e-12):
            raise UserError(f"The experts module {self.path} computes something other than act(gate)·up → down "
                            f"weighted by the router, so its experts cannot be measured one by one.")
        self._accumulate(hidden)
        self.output = total
        return total

    @torch.no_grad()
    def _accumulate(self, hidden: torch.Tensor) -> None:
        flat = hidden.detach().float()
        self._input_sum = _added(self._input_sum, flat.T @ flat)
        self.all_tokens += flat.shape[0]
        for e, (token, x, _, z, _) in self.routed.items():
            x, z = x.detach().float(), z.detach().float()
            self._gate_up[e] = _added(self._gate_up.get(e), x.T @ x)
            self._down[e] = _added(self._down.get(e), z.T @ z)
            self.tokens[e] += int(token.numel())

    # -- traces ------------------------------------------------------------------------------------------------------

    def trace_tensors(self) -> list[torch.Tensor]:
        """The outputs whose gradients give every expert's weight gradient: gate/up output and down output per
        expert (experts that received no token contribute nothing)."""
        return [tensor for e in sorted(self.routed) for tensor in (self.routed[e][2], self.routed[e][4])]

    @torch.no_grad()
    def add_traces(self, grads: list[torch.Tensor], sums: dict[str, torch.Tensor], length: int) -> None:
        """Add each segment's ‖∂(uᵀF)/∂W‖² of every expert layer to `sums[layer.name]` (one entry per segment)."""
        by_expert = {e: grads[2 * i: 2 * i + 2] for i, e in enumerate(sorted(self.routed))}
        n = next(iter(sums.values())).shape[0]
        for layer in self.layers:
            token, x, _, z, _ = self.routed[layer.expert]
            grad_gate_up, grad_down = by_expert[layer.expert]
            if layer.kind == "down":
                delta, inputs = grad_down, z
            else:
                delta, inputs = layer.rows.take(grad_gate_up, -1), x
            segment = token // length
            for s in range(n):
                mine = segment == s
                gradient = delta[mine].float().T @ inputs[mine].detach().float()
                sums[layer.name][s] += gradient.square().sum()

    # -- results -----------------------------------------------------------------------------------------------------

    def hessians(self, block: int) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
        """(H per expert layer, routed tokens per expert layer, layers whose Hessian fell back to the pooled one)."""
        pooled_down = sum(self._down.values())
        fallback = {"down": pooled_down * (2.0 / max(sum(self.tokens), 1)),
                    "gate_up": self._input_sum * (2.0 / self.all_tokens)}
        hessians, tokens, pooled = {}, {}, []
        for layer in self.layers:
            e = layer.expert
            own = self._down[e] if layer.kind == "down" else self._gate_up[e]
            tokens[layer.name] = self.tokens[e]
            if self.tokens[e] >= own.shape[0]:
                hessians[layer.name] = (own * (2.0 / self.tokens[e])).cpu()
            else:
                pooled.append(layer.name)
                hessians[layer.name] = fallback["down" if layer.kind == "down" else "gate_up"].cpu()
        starved = sorted({layer.expert for layer in self.layers if layer.name in pooled})
        if starved:
            warnings.warn(f"Block {block}: experts {starved} received fewer calibration tokens than their input width "
                          f"({[self.tokens[e] for e in starved]} tokens); their Hessians are those of all the block's "
                          f"MLP tokens (our fallback).", stacklevel=2)
        return hessians, tokens, pooled


def _added(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value
