"""What quantization does to the text a model writes: the same prompt continued greedily by the full-precision and
the quantized model, side by side. Prompts are the openings of paragraphs of the corpus's evaluation split, so they
are the text the perplexity is measured on; short (our choice: a class reads them at a glance)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from aptq.data import Corpus

PROMPT_WORDS = 12
NEW_TOKENS = 16


@dataclass(frozen=True)
class Completion:
    prompt: str
    full_precision: str
    quantized: str

    @property
    def same(self) -> bool:
        return self.full_precision == self.quantized


def corpus_prompts(corpus: Corpus, count: int, words: int = PROMPT_WORDS) -> list[str]:
    """The first `words` words of `count` paragraphs spread evenly over the evaluation split."""
    paragraphs = [p for p in corpus.text("evaluation").split("\n\n") if len(p.split()) >= words]
    if not paragraphs or count < 1:
        return []
    step = len(paragraphs) / min(count, len(paragraphs))
    return [" ".join(paragraphs[int(i * step)].split()[:words]) for i in range(min(count, len(paragraphs)))]


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> str:
    """The model's greedy continuation of `prompt` (argmax token after token), decoded without the prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    start = ids.shape[1]
    for _ in range(new_tokens):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def side_by_side(model: torch.nn.Module, quantized: Callable[[], AbstractContextManager[torch.nn.Module]], tokenizer,
                 prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[Completion]:
    """Each prompt continued by `model` as it is, then by the model inside `quantized()` (the run's quantized weights
    swapped in: no second copy of the model)."""
    references = [greedy(model, tokenizer, prompt, new_tokens) for prompt in prompts]
    with quantized() as swapped:
        return [Completion(prompt, reference, greedy(swapped, tokenizer, prompt, new_tokens))
                for prompt, reference in zip(prompts, references)]
