"""Quantize: run a plan (the current one, a saved one, or uniform) with RTN, GPTQ or attention-aware GPTQ, and measure
perplexity, KL divergence and top-1 agreement against full precision. Every run lands in the store, where it can be
named, tagged, filtered, deleted and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from aptq import coverage, history, validate
from aptq.aespa import AespaOptions
from aptq.blockwise import BlockRefinement
from aptq.choices import (
    ACT_ORDER_FROM,
    ACT_ORDER_WIDTHS,
    ATTENTION_SHRINK,
    FP_TARGETS,
    METHOD_LABELS,
    QUANTIZERS,
    ROW_WEIGHT_CHOICES,
    ROW_WEIGHTS,
    act_order_label,
)
from aptq.data import Corpus, digest
from aptq.export import EXPORT_FORMATS, export_parts
from aptq.models import LoadedModel
from aptq.pipeline import EvalSettings, QuantizeSettings, has_output_norms, run_plan, uniform_plan
from aptq.progress import Progress
from aptq.store import Store, default_path
from aptq.teaching import Completion
from aptq.timing import expected_run_time
from ui import jobs
from ui.plans import PlanChoice, measured_runs, model_layer_table, plan_choices
from ui.session import (
    analysis_request,
    checked,
    corpus_spec,
    model_and_corpus_or_stop,
    model_source,
    page_header,
    requested_analysis,
    store_call,
)
from ui.shell import presenting

COMPLETION_PROMPTS = 3  # (our choice) enough to see the difference, few enough to read on a slide
RUN_COLUMNS = {"created": st.column_config.DatetimeColumn("when", format="YYYY-MM-DD HH:mm"),
               "label": "name", "tag": "tag", "plan_name": "plan", "allocation": "solver", "error_source": "errors",
               "error_unit": "unit", "quantizer": "quantizer",
               "coverage": "covers", "covered_avg_bits": st.column_config.NumberColumn("bits (covered)", format="%.3f"),
               "avg_bits": st.column_config.NumberColumn("bits (whole model)", format="%.3f"),
               "perplexity": st.column_config.NumberColumn("perplexity", format="%.3f"),
               "fp_perplexity": st.column_config.NumberColumn("FP perplexity", format="%.3f"),
               "kl": st.column_config.NumberColumn("KL", format="%.4f"),
               "top1": st.column_config.NumberColumn("top-1", format="percent"),
               "group_size": "group", "quant_seconds": st.column_config.NumberColumn("quantize s", format="%.1f"),
               "eval_seconds": st.column_config.NumberColumn("evaluate s", format="%.1f"), "device": "device",
               "corpus": "corpus", "eval_seqlen": "window", "eval_tokens": "tokens", "notes": "notes"}


def uniform_choice(loaded: LoadedModel, corpus: Corpus, bits: int) -> PlanChoice:
    """Every analysed layer at `bits` (the whole model without a stored analysis, then without a prediction)."""
    request, key, frames = requested_analysis(loaded, corpus)
    if frames is None or bits not in set(frames[1]["bits"]):
        return PlanChoice(f"uniform {bits} bits, whole model (no stored analysis: no prediction)", f"uniform-{bits}",
                          uniform_plan(loaded.arch, bits), "uniform", float(bits), request.group_size, {})
    plan, summary = coverage.uniform_over(*frames, bits, request.group_size)
    scope = coverage.coverage_of(loaded.arch, plan)
    label = f"uniform {bits} bits" + ("" if scope.whole_model else f" over the analysed {scope.label} (others FP16)")
    return PlanChoice(label, f"uniform-{bits}", plan, "uniform", float(bits), request.group_size,
                      summary | {"analysis": key})


def show_result(row: dict) -> None:
    cols = [column for _ in range(2) for column in st.columns(3)]  # two rows: long values and labels fit
    cols[0].metric("Perplexity", f"{row['perplexity']:.3f}", f"{row['perplexity'] - row['fp_perplexity']:+.3f} vs "
                   f"full precision {row['fp_perplexity']:.3f}", delta_color="inverse")
    cols[1].metric("KL divergence", f"{row['kl']:.4f}", help="KL(full precision ‖ quantized), nats per token")
    cols[2].metric("Top-1 agreement", f"{row['top1']:.1%}")
    cols[3].metric(f"Average bits ({row['coverage']})", f"{row['covered_avg_bits']:.3f}",
                   help="over the layers the plan decides")
    cols[4].metric("Average bits (whole model)", f"{row['avg_bits']:.3f}",
                   help=f"{row['size_mb']:.1f} MB; layers the plan does not decide stay in FP16")
    cols[5].metric("Time", f"{row['quant_seconds'] + row['eval_seconds']:.0f} s",
                   help=f"quantizing {row['quant_seconds']:.1f} s + evaluating {row['eval_seconds']:.1f} s on "
                        f"{row['device']}")
    if row["covered_avg_bits"] != row["avg_bits"]:
        st.info(f"The plan covers {row['coverage']}: {row['covered_avg_bits']:.3f} bits there, and the other layers "
                f"stay in FP16, so the whole model averages {row['avg_bits']:.3f} bits.")
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
    show_completions(row.get("completions"))


def show_completions(stored: str | None) -> None:
    """The run's prompts continued greedily by both models, side by side."""
    if not isinstance(stored, str):
        st.caption("No completions stored with this run (it was measured without them).")
        return
    samples = [Completion(**c) for c in json.loads(stored)]
    st.markdown("**The same prompts, continued greedily** (from the evaluation split):")
    # A static table wraps its text, so both continuations are read in full side by side (a data grid cuts them).
    st.table(pd.DataFrame({"prompt": [c.prompt + " …" for c in samples],
                           "full precision": [c.full_precision for c in samples],
                           "quantized": [c.quantized for c in samples],
                           "same?": ["same" if c.same else "differs" for c in samples]}).set_index("prompt"))


def time_estimate(runs: pd.DataFrame | None, settings: QuantizeSettings, device: str, choice: PlanChoice,
                  samples: int, seqlen: int, tokens: int) -> str:
    steps = settings.block.iterations
    found = None if runs is None or runs.empty else expected_run_time(runs, settings.method, device, choice.bits,
                                                                      samples, seqlen, tokens, steps)
    if found is None:
        refined = f" with {steps} block-refinement steps" if steps else ""
        return (f"No earlier {METHOD_LABELS[settings.method]} run{refined} on {device}: this one measures the speed "
                f"(RTN takes seconds, GPTQ minutes on a CPU).")
    return (f"Expected: about {jobs.format_seconds(found.total)} (quantizing {jobs.format_seconds(found.quant_seconds)}"
            f", evaluating {jobs.format_seconds(found.eval_seconds)}), from {found.runs} earlier run(s) on {device}; "
            f"the first run of a new evaluation protocol also measures the full-precision model once.")


def manage_runs(runs: pd.DataFrame) -> None:
    """Filter, name, tag, delete (after a confirmation) and export the runs."""
    cols = st.columns([2, 1, 1], vertical_alignment="bottom")
    text = cols[0].text_input("Filter", key="runs_filter", placeholder="name, plan, solver, quantizer, tag…")
    tags = sorted(t for t in runs["tag"].dropna().unique())
    tag = cols[1].selectbox("Tag", [""] + tags, key="runs_tag", format_func=lambda t: t or "any tag")
    shown = history.filter_runs(runs, text, tag or None)
    cols[2].download_button("Runs as CSV", history.runs_csv(shown), "runs.csv", "text/csv")
    event = st.dataframe(shown[list(RUN_COLUMNS)], hide_index=True, column_config=RUN_COLUMNS, on_select="rerun",
                         selection_mode="multi-row", key="runs_table")
    picked = shown.iloc[event.selection.rows] if event.selection.rows else shown.iloc[:0]
    st.caption(f"{len(shown)} of {len(runs)} run(s) in `{default_path()}`; select rows to name, tag or delete them.")
    if len(picked) == 1:
        row = picked.iloc[0]
        show_completions(row["completions"])
        with st.form("name_run"):
            left, right = st.columns(2)
            label = left.text_input("Name", value=row["label"] if pd.notna(row["label"]) else "")
            new_tag = right.text_input("Tag", value=row["tag"] if pd.notna(row["tag"]) else "")
            if st.form_submit_button("Save name and tag"):
                store_call(lambda: history.label_run(Store(), row["key"], label, new_tag))
                st.rerun()
    if not picked.empty:
        if st.button(f"Delete {len(picked)} selected run(s)…"):
            st.session_state["confirm_delete"] = list(picked["key"])
        pending = st.session_state.get("confirm_delete")
        if pending == list(picked["key"]):
            st.warning(f"Delete {len(pending)} run(s) from the store? Their measurements are lost; quantizing the "
                       f"same plan again remeasures them.")
            yes, no = st.columns(2)
            if yes.button("Yes, delete", type="primary"):
                store_call(lambda: history.delete_runs(Store(), pending))
                st.session_state.pop("confirm_delete")
                st.rerun()
            if no.button("Keep them"):
                st.session_state.pop("confirm_delete")
                st.rerun()


page_header("Quantize")
loaded, corpus, model_fp = model_and_corpus_or_stop()
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
    method = st.radio("Quantizer", QUANTIZERS, index=QUANTIZERS.index("rtn"), format_func=METHOD_LABELS.get,
                      horizontal=True, key="run_method", help="RTN takes seconds; GPTQ and the attention-aware "
                                                              "method collect Hessians on the calibration data first")
    group_options = sorted({0, 32, 64, 128, choice.group_size})
    group = st.selectbox("Group size", group_options, index=group_options.index(choice.group_size),
                         format_func=lambda g: f"{g} columns" if g else "per output channel", key="run_group",
                         disabled=bool(choice.layer_groups))
    if choice.layer_groups:  # the plan chose a group size per layer: the others keep the plan's
        group = choice.group_size
        st.caption(f"This plan gives {len(choice.layer_groups)} layers their own group size ((bits, group size) "
                   f"pairs); the others use {choice.group_size or 'per-channel'} groups.")
    flags = st.columns(2)
    symmetric = flags[0].checkbox("Symmetric grid", key="run_symmetric") if not presenting() else False
    act_order_from = flags[1].selectbox(
        "Act-order", ACT_ORDER_WIDTHS, index=ACT_ORDER_WIDTHS.index(ACT_ORDER_FROM), key="run_act_order",
        format_func=act_order_label,
        help="quantize columns by decreasing diag(H), static groups; (our choice) a width rule: measured to help at 3 "
             "bits and hurt at 2 (bench/results/peers.md)") if not presenting() else ACT_ORDER_FROM
    shrink = st.slider("Shrink toward GPTQ", 0.0, 1.0, ATTENTION_SHRINK, 0.05, key="run_shrink",
                       help="(our choice) v's and q/k's attention-aware Hessians mixed with GPTQ's by this share: 0 "
                            "as the papers give them, 1 plain GPTQ; the default was chosen on held-out calibration "
                            "segments (bench/results/quantizer.md)") \
        if method in ("attention", "aespa") and not presenting() else ATTENTION_SHRINK
    row_weights = st.radio("q/k row Hessians", ROW_WEIGHT_CHOICES, index=ROW_WEIGHT_CHOICES.index(ROW_WEIGHTS),
                           horizontal=True, key="run_row_weights",
                           help="(our choice) uniform: each query's score changes on its visible keys count alike "
                                "(the papers' E[KᵀK]); attention: weighted by the query's attention probabilities and "
                                "centred, the change of its attention distribution (docs/algorithms.md §15)") \
        if method in ("attention", "aespa") and not presenting() else ROW_WEIGHTS
    post_norms = has_output_norms(loaded)
    output_norms = st.checkbox("Weigh by the post-norms", value=post_norms, key="run_output_norms",
                               help="(our choice) this model normalises its out and down projections' outputs: each "
                                    "token's error counts as the norm divides it, 1/σ² of the output "
                                    "(docs/algorithms.md §16); on by default, measured on held-out windows") \
        if method in ("attention", "aespa") and post_norms and not presenting() else post_norms
    fp_targets = st.slider("Fit the full-precision outputs", 0.0, 1.0, FP_TARGETS, 0.05, key="run_fp_targets",
                           help="(our choice) this share of each layer's objective is the full-precision model's "
                                "output, the rest the layer's output on the quantized model's inputs: W* = W + share·"
                                "W D H⁻¹, 0 = off (docs/algorithms.md §17); the default was chosen on held-out "
                                "windows (bench/results/peers.md)") \
        if method != "rtn" and not presenting() else FP_TARGETS
    block_steps = st.number_input("Block refinement steps", min_value=0, max_value=2000, value=0, step=50,
                                  key="run_block_steps",
                                  help="(our choice, beyond the papers) after each block's layers are quantized, "
                                       "their codes and scales tuned together on the block's output, one calibration "
                                       "batch per step; 0 = off. Each step is a forward and backward pass of the "
                                       "block. Measured: it helps at 2 bits, not at 3 (docs/algorithms.md §18, "
                                       "bench/results/peers_64x512_16384.md)") \
        if method != "rtn" and not presenting() else 0
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

settings = QuantizeSettings(method=method, group_size=int(group), symmetric=symmetric, act_order_from=act_order_from,
                            aespa=AespaOptions.for_device(str(loaded.device)), shrink=float(shrink),
                            row_weights=row_weights, output_norms=output_norms, fp_targets=fp_targets,
                            block=BlockRefinement(int(block_steps)), layer_groups=choice.layer_groups)
evaluation = EvalSettings(seqlen=int(seqlen), max_tokens=int(tokens), prompts=COMPLETION_PROMPTS)
meta = choice.run_meta()
if group != choice.group_size:  # the predictions were made for another group size: they would mislead
    meta = {k: v for k, v in meta.items() if not k.startswith("predicted_error")}
    st.caption(f"Predicted errors are for group size {choice.group_size}; this run is stored without them.")
job_key = "run:" + digest(model_source(), corpus_spec(), history.plan_json(choice.bits), repr(settings),
                          repr(evaluation), repr(request.sampling), export_dir.strip(), str(overwrite),
                          repr(export_formats))
runs = measured_runs(loaded, model_fp)


def start_run() -> None:
    """A button callback: the job exists before the page is drawn, so this very run already shows it running. The
    export directory is checked first (from the widget's state: the callback runs before the page does)."""
    target = st.session_state.get("run_export_dir", "").strip()
    if target and not checked(lambda: validate.export_target(target, bool(st.session_state.get("run_overwrite")),
                                                             keep=(loaded.path, default_path()))):
        return
    store = Store(default_path())

    def work(progress: Progress) -> history.RunRecord:
        return run_plan(loaded, corpus, request.sampling, choice.bits, settings, evaluation, store=store,
                        progress=progress, plan_meta=meta, export_dir=export_dir.strip() or None,
                        overwrite=overwrite, export_formats=tuple(export_formats))

    jobs.start(job_key, f"{METHOD_LABELS[method]} · {meta['name']}", model_source(), work)
    st.session_state["last_run"] = job_key


st.caption(time_estimate(runs, settings, str(loaded.device), choice, request.samples, request.seqlen, int(tokens)))
st.button("Quantize and evaluate", type="primary", on_click=start_run)
last = jobs.find(st.session_state.get("last_run", ""))
if last is not None and last.state == "finished":
    row = coverage.fill_coverage(pd.DataFrame([last.result.as_dict()]), loaded.arch, model_layer_table(model_source()))
    show_result(row.iloc[0].to_dict())
else:
    jobs.show(last)

st.subheader("Runs of this model")
if runs is None or runs.empty:
    st.info("No runs yet: choose a plan and press **Quantize and evaluate**. Compare runs on the Trade-offs page.")
else:
    manage_runs(runs)
    st.caption(f"Baseline (full precision): {loaded.baseline_label}.")
