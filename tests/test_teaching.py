"""Completions side by side on a real tiny model: greedy decoding as transformers does it, prompts from the corpus's
evaluation split, stored with the run."""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch

from aptq import teaching
from aptq.data import Sampling, load_corpus
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.store import Store


def test_greedy_matches_transformers_generate(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    prompt = "The jury said it did find that"
    ids = torch.tensor([loaded.tokenizer(prompt)["input_ids"]])
    expected = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     pad_token_id=0)
    assert teaching.greedy(loaded.model, loaded.tokenizer, prompt, 6) == loaded.tokenizer.decode(
        expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_prompts_open_paragraphs_of_the_evaluation_split():
    corpus = load_corpus("brown")
    prompts = teaching.corpus_prompts(corpus, 3, words=8)
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert all(len(p.split()) == 8 and p.split()[0] in corpus.text("evaluation") for p in prompts)
    assert teaching.corpus_prompts(corpus, 0) == []


def test_a_run_stores_both_completions_of_each_prompt(tmp_path, tiny_model_dir):
    loaded, corpus = load_model(str(tiny_model_dir("llama")), device="cpu"), load_corpus("brown")
    row = run_plan(loaded, corpus, Sampling(2, 32), uniform_plan(loaded.arch, 2),
                   QuantizeSettings(method="rtn", group_size=0), EvalSettings(seqlen=32, max_tokens=64, prompts=2),
                   store=Store(tmp_path / "s.duckdb"))
    stored = [teaching.Completion(**c) for c in json.loads(row.completions)]
    assert [c.prompt for c in stored] == teaching.corpus_prompts(corpus, 2)
    assert stored[0].full_precision == teaching.greedy(loaded.model, loaded.tokenizer, stored[0].prompt)
    same = teaching.side_by_side(loaded.model, lambda: nullcontext(loaded.model), loaded.tokenizer,
                                 [stored[0].prompt], 4)
    assert same[0].same
