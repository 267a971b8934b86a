"""Quantize: run a plan (the current one, a saved one, or uniform) with RTN, GPTQ or attention-aware GPTQ, and measure
perplexity, KL divergence and top-1 agreement against full precision. Every run lands in the store."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from aptq import history, validate
from aptq.allocate import AllocationRequest, allocate, summarize
from aptq.data import Corpus, digest
from aptq.export import EXPORT_FORMATS, export_parts
from aptq.models import LoadedModel
from aptq.choices import METHOD_LABELS, QUANTIZERS
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.progress import Progress
from aptq.store import Store, default_path
from ui import jobs
from ui.plans import PlanChoice, plan_choices
from ui.session import (analysis_request, cached_analysis_key, cached_model_fingerprint, checked, corpus_spec,
                        current_corpus, current_model, model_source, page_header, store_call, stored_analysis)

RUN_COLUMNS = ["created", "plan_name", "allocation", "budget", "method", "group_size", "avg_bits", "effective_bits",
               "size_mb", "perplexity", "fp_perplexity", "kl", "top1", "quant_seconds", "eval_seconds", "device",
               "corpus", "eval_seqlen", "eval_tokens", "notes"]


def uniform_choice(loaded: LoadedModel, corpus: Corpus, bits: int) -> PlanChoice:
    """Every layer at `bits`; with predicted errors when the session's analysis is stored."""
    request = analysis_request(loaded, corpus)
    key = cached_analysis_key(model_source(), corpus_spec(), request)
    frames = store_call(lambda: stored_analysis(key))
    summary = {}
    if frames is not None and bits in set(frames[1]["bits"]):
        layers, errors = frames
        plan = allocate(layers, errors, AllocationRequest(bits, "uniform", (bits,), group_size=request.group_size))
        summary = summarize(plan, layers, errors) | {"analysis": key}
    return PlanChoice(f"uniform {bits} bits", f"uniform-{bits}", uniform_plan(loaded.arch, bits), "uniform",
                      float(bits), request.group_size, summary)


def show_result(row: dict) -> None:
    cols = st.columns(6)
    cols[0].metric("Perplexity", f"{row['perplexity']:.3f}", f"{row['perplexity'] - row['fp_perplexity']:+.3f} vs "
                   f"{row['fp_perplexity']:.3f}", delta_color="inverse")
    cols[1].metric("KL divergence", f"{row['kl']:.4f}", help="KL(full precision ‖ quantized), nats per token")
    cols[2].metric("Top-1 agreement", f"{row['top1']:.1%}")
    cols[3].metric("Average bits", f"{row['avg_bits']:.3f}", f"{row['size_mb']:.1f} MB", delta_color="off")
    cols[4].metric("Quantization", f"{row['quant_seconds']:.1f} s", row["device"], delta_color="off")
    cols[5].metric("Evaluation", f"{row['eval_seconds']:.1f} s")
    st.caption(f"Perplexity protocol: {row['corpus']} evaluation split, window {row['eval_seqlen']}, "
               f"{row['eval_tokens']} predicted tokens." + (" Stored earlier: no model work was done."
                                                            if row.get("cached") else "")
               + (f" Exported to `{row['export_dir']}`." if row.get("export_dir") else ""))
    if row.get("export_dir") and Path(row["export_dir"]).is_dir():
        parts = export_parts(Path(row["export_dir"]))
        for column, part in zip(st.columns(len(parts)), parts):  # zipped when the button is pressed
            column.download_button(part.label, part.read, file_name=part.file_name, key=f"download:{part.file_name}")
    if row.get("notes"):
        st.warning(row["notes"])


page_header("Quantize")
loaded, corpus = current_model(), current_corpus()
if loaded is None or corpus is None:
    st.stop()
model_fp = cached_model_fingerprint(model_source())
choices = plan_choices(model_fp)

left, right = st.columns(2)
with left:
    st.subheader("Plan")
    options = list(choices) + ["uniform"]
    picked = st.selectbox("Plan to run", options, format_func=lambda k: choices[k].label if k in choices else
                          "uniform width (every layer the same)", key="run_plan_choice")
    if picked == "uniform":
        bits = st.selectbox("Width", [2, 3, 4, 8], index=2, key="run_uniform_bits", format_func=lambda b: f"{b} bits")
        choice = uniform_choice(loaded, corpus, int(bits))
    else:
        choice = choices[picked]
    if "current" not in choices:
        st.caption("No current plan: drag a budget on the Bit budget page, or run a uniform or saved plan.")
    request = analysis_request(loaded, corpus)
    st.caption(f"GPTQ calibration: {request.samples} × {request.seqlen} tokens of {corpus.name} (seed {request.seed}) "
               f"— the Home page's analysis settings.")
with right:
    st.subheader("Method")
    method = st.radio("Quantizer", QUANTIZERS, index=QUANTIZERS.index("attention"), format_func=METHOD_LABELS.get,
                      horizontal=True, key="run_method")
    group_options = sorted({0, 32, 64, 128, choice.group_size})
    group = st.selectbox("Group size", group_options, index=group_options.index(choice.group_size),
                         format_func=lambda g: f"{g} columns" if g else "per output channel", key="run_group")
    flags = st.columns(2)
    symmetric = flags[0].checkbox("Symmetric grid", key="run_symmetric")
    act_order = flags[1].checkbox("Act-order", key="run_act_order", help="quantize columns by decreasing diag(H)")
    window = st.columns(2)
    seqlen = window[0].number_input("Evaluation window", min_value=16, max_value=loaded.max_length,
                                    value=min(512, loaded.max_length), step=64, key="run_seqlen")
    tokens = window[1].number_input("Evaluation tokens", min_value=16, value=16384, step=int(seqlen),
                                    key="run_tokens")
with st.expander("Export the quantized model (optional)"):
    export_dir = st.text_input("Directory", key="run_export_dir",
                               help="dequantized safetensors that transformers loads as is, plus the plan files")
    overwrite = st.checkbox("Overwrite if it exists", key="run_overwrite")
    export_formats = st.multiselect("Also write", EXPORT_FORMATS, key="run_export_formats",
                                    help="gptq / compressed-tensors: packed checkpoints of this run's own codes that "
                                         "GPTQModel, vLLM and transformers load; llama.cpp: the plan as "
                                         "llama-quantize tensor-type overrides")

settings = QuantizeSettings(method=method, group_size=int(group), symmetric=symmetric, act_order=act_order)
evaluation = EvalSettings(seqlen=int(seqlen), max_tokens=int(tokens))
meta = choice.run_meta()
if group != choice.group_size:  # the predictions were made for another group size: they would mislead
    meta = {k: v for k, v in meta.items() if not k.startswith("predicted_error")}
    st.caption(f"Predicted errors are for group size {choice.group_size}; this run is stored without them.")
job_key = "run:" + digest(model_source(), corpus_spec(), history.plan_json(choice.bits), repr(settings),
                          repr(evaluation), repr(request.sampling), export_dir.strip(), str(overwrite),
                          repr(export_formats))
if st.button("Quantize and evaluate", type="primary") and (not export_dir.strip() or checked(
        lambda: validate.export_target(export_dir.strip(), overwrite, keep=(loaded.path, default_path())))):
    store = Store(default_path())

    def work(progress: Progress) -> dict:
        return run_plan(loaded, corpus, request.sampling, choice.bits, settings, evaluation, store=store,
                        progress=progress, plan_meta=meta, export_dir=export_dir.strip() or None,
                        overwrite=overwrite, export_formats=tuple(export_formats))

    jobs.start(job_key, f"{METHOD_LABELS[method]} · {meta['name']}", model_source(), work)
    st.session_state["last_run"] = job_key
last = jobs.find(st.session_state.get("last_run", ""))
if last is not None and last.state == "finished":
    show_result(last.result)
else:
    jobs.show(last)

st.subheader("Runs of this model")
runs = store_call(lambda: history.stored_runs(Store(), model_fp))
if runs is None or runs.empty:
    st.info("No runs yet: choose a plan and press **Quantize and evaluate**. Compare runs on the Trade-offs page.")
else:
    st.dataframe(runs[RUN_COLUMNS], hide_index=True, column_config={
        "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        "top1": st.column_config.NumberColumn(format="percent")})
    st.caption(f"{len(runs)} run(s) in `{default_path()}`. Baseline (full precision): {loaded.baseline_label}.")
