"""Home: choose the model and the corpus, see what was loaded, measure the full-precision perplexity."""

from __future__ import annotations

import streamlit as st

from aptq.data import evaluation_windows, token_ids
from aptq.errors import UserError
from aptq.evaluate import evaluate
from aptq.models import EMBEDDED_MODEL, SUPPORTED_FAMILIES
from ui.session import CORPORA, current_corpus, current_model, progress_bar

st.set_page_config(page_title="APTQ studio", page_icon="🎚️", layout="wide")
st.title("Mixed-precision quantization studio")
st.caption("See how sensitive every layer is, drag a bit budget, quantize, watch perplexity move. "
           "APTQ · aespa · BoA, and what we built past them.")

with st.form("model_and_corpus"):
    left, right = st.columns(2)
    model_source = left.text_input("Model", value=st.session_state.get("model_source", EMBEDDED_MODEL),
                                   help="Hub id (when reachable or cached), local HF directory, .gguf file, or "
                                        f"the embedded default `{EMBEDDED_MODEL}`. Families: "
                                        f"{', '.join(SUPPORTED_FAMILIES)}.")
    corpus_choice = right.selectbox("Corpus", list(CORPORA), format_func=CORPORA.get,
                                    index=list(CORPORA).index(st.session_state.get("corpus_choice", "brown")))
    corpus_path = right.text_input("Text file (for a local file)", value=st.session_state.get("corpus_path", ""))
    if st.form_submit_button("Use this model and corpus"):
        st.session_state.update(model_source=model_source.strip() or EMBEDDED_MODEL, corpus_choice=corpus_choice,
                                corpus_path=corpus_path,
                                corpus_spec=corpus_path.strip() if corpus_choice == "file" else corpus_choice)

loaded = current_model()
corpus = current_corpus()
if loaded is None or corpus is None:
    st.stop()

arch = loaded.arch
st.subheader(loaded.display_name)
cols = st.columns(5)
cols[0].metric("Parameters", f"{loaded.n_params / 1e6:.1f} M")
cols[1].metric("Family", arch.family)
cols[2].metric("Blocks", arch.n_blocks)
cols[3].metric("Heads (query / KV)", f"{arch.n_heads} / {arch.n_kv_heads}")
cols[4].metric("Device", f"{loaded.device} {str(loaded.model.dtype).removeprefix('torch.')}")
st.caption(f"Weights from `{loaded.path}`. Baseline: **{loaded.baseline_label}**. "
           f"{len(arch.layers)} quantizable linear layers; RoPE: {arch.rope}; GQA: {arch.gqa}.")
st.write(f"**Corpus:** {corpus.description}.")

st.subheader("Full-precision perplexity")
c1, c2 = st.columns(2)
seqlen = c1.number_input("Window (tokens)", min_value=16, max_value=loaded.max_length, value=512, step=64)
max_tokens = c2.number_input("Tokens to evaluate", min_value=int(seqlen), value=16384, step=int(seqlen),
                             help="Non-overlapping windows from the start of the evaluation split (GPTQ protocol). "
                                  "~500 tokens/s on 2 CPU cores.")
if st.button("Measure perplexity", type="primary"):
    try:
        windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), int(seqlen), int(max_tokens))
        update, done = progress_bar("Evaluating")
        result = evaluate(loaded.model, windows, progress=update)
        done()
        st.session_state.setdefault("fp_results", []).append(
            {"model": loaded.display_name, "corpus": corpus.name, "window": result.seqlen, "tokens": result.tokens,
             "perplexity": round(result.perplexity, 4), "tokens/s": round(result.tokens_per_second)})
    except UserError as exc:
        st.error(str(exc))
for row in reversed(st.session_state.get("fp_results", [])):
    st.success(f"Perplexity **{row['perplexity']:.3f}** on {row['corpus']} evaluation split, window {row['window']}, "
               f"{row['tokens']} predicted tokens ({row['tokens/s']} tokens/s).")
