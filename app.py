"""The dashboard's entry point: the navigation (ui.shell), then Home — choose model and corpus, run (or resume) the
sensitivity analysis, measure full-precision perplexity."""

from __future__ import annotations

import streamlit as st

from aptq import charts, history
from aptq.calibrate import calibrate_unit
from aptq.data import Corpus, evaluation_windows, token_ids
from aptq.evaluate import Evaluation, evaluate
from aptq.models import EMBEDDED_MODEL, SUPPORTED_FAMILIES, LoadedModel
from aptq.progress import Progress
from aptq.sensitivity import CPU_CALIBRATION, GPU_CALIBRATION, analyze
from aptq.store import Store, default_path
from ui import jobs
from ui.experts import separate_experts
from ui.session import (
    CORPORA,
    AnalysisRequest,
    analysis_request,
    analysis_status,
    cached_analysis_key,
    cached_model_fingerprint,
    checked,
    corpus_spec,
    current_corpus,
    current_model,
    describe,
    expected_analysis_time,
    model_source,
    page_header,
    store_call,
    stored_analysis,
    stored_unit,
    usable_choice,
)
from ui.shell import navigate, write_url

if not navigate():  # another page was chosen and has run
    st.stop()

# Session keys that belong to one model: forgotten when the model or corpus changes.
PER_MODEL_KEYS = ("analysis_request", "calib_samples", "calib_seqlen", "group_size", "max_blocks", "pins", "plan",
                  "pins_text", "url_pins", "quantizer_errors", "extra_group_sizes", "calibrate_unit")
GROUP_SIZES = (0, 32, 64, 128)
NOT_TIMED = "The expected time below does not count it (it times blocks alike, whatever their options)."
QUANTIZER_ERRORS_HELP = ("Also predict the errors that GPTQ and the attention-aware GPTQ leave (`aptq analyze "
                         "--quantizer-errors`), so that Bit budget and sweeps plan with the quantizer that will run. "
                         "Costs one GPTQ run per layer, width and group size (two for q, k and v) on top of the "
                         f"analysis. {NOT_TIMED}")
EXTRA_GROUPS_HELP = ("Also predict the errors at these group sizes (`--extra-group-sizes`), so that the knapsack "
                     "can choose (bits, group size) pairs, charged by their effective bits. Each size must divide "
                     "every layer's input columns, and repeats the error computations of every layer and width. "
                     f"{NOT_TIMED}")
CALIBRATE_HELP = ("Then measure the calibrated cross-layer unit (`--calibrate-unit`): KL of noise injected into one "
                  "layer at a time on the last quarter of the calibration segments (needs at least 8): forward "
                  "passes over them per layer, about 1 min per layer of the embedded model at 16 × 512 on a CPU. "
                  "Plans may then use the unit \"calibrated\". " + NOT_TIMED)

page_header("Mixed-precision quantization studio")
st.markdown("See how sensitive every layer is, drag a bit budget, quantize, watch perplexity move — "
            "APTQ · aespa · BoA, and what we built past them. **Start here:** pick a model and a corpus, run the "
            "sensitivity analysis once (it is stored), then open **Sensitivity** and **Bit budget** in the sidebar.")

with st.form("model_and_corpus"):
    left, right = st.columns(2)
    source = left.text_input("Model", value=model_source(),
                             help="Hub id (when reachable or cached), local HF directory, .gguf file, or "
                                  f"the embedded default `{EMBEDDED_MODEL}`. Families: "
                                  f"{', '.join(SUPPORTED_FAMILIES)}.")
    corpus_choice = right.selectbox("Corpus", list(CORPORA), format_func=CORPORA.get,
                                    index=list(CORPORA).index(st.session_state.get("corpus_choice", "brown")))
    corpus_path = right.text_input("Text file (for a local file)", value=st.session_state.get("corpus_path", ""))
    submitted = st.form_submit_button("Use this model and corpus")
    chosen = {"model_source": source.strip() or EMBEDDED_MODEL,
              "corpus_spec": corpus_path.strip() if corpus_choice == "file" else corpus_choice}
    if submitted and usable_choice(chosen["model_source"], chosen["corpus_spec"]):
        if chosen != {"model_source": model_source(), "corpus_spec": corpus_spec()}:
            for key in PER_MODEL_KEYS:
                st.session_state.pop(key, None)
        st.session_state.update(chosen, corpus_choice=corpus_choice, corpus_path=corpus_path)
        st.rerun()

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


def analysis_controls(loaded: LoadedModel, corpus: Corpus) -> AnalysisRequest:
    """Calibration size, group size, blocks and the options of `aptq analyze`; the request they make is kept for the
    other pages."""
    request = analysis_request(loaded, corpus)
    n_blocks = loaded.arch.n_blocks
    for key, value in (("calib_samples", request.samples), ("calib_seqlen", request.seqlen),
                       ("group_size", request.group_size), ("max_blocks", request.max_blocks or n_blocks),
                       ("quantizer_errors", request.quantizer_errors),
                       ("extra_group_sizes", list(request.extra_group_sizes)),
                       ("calibrate_unit", request.calibrate_unit)):
        st.session_state.setdefault(key, value)
    cols = st.columns(4)
    samples = cols[0].number_input("Calibration segments", min_value=1, max_value=4096, key="calib_samples",
                                   help=f"Random segments of the calibration split. Defaults: CPU "
                                        f"{CPU_CALIBRATION[0]} × {CPU_CALIBRATION[1]} tokens (our choice, minutes), "
                                        f"GPU {GPU_CALIBRATION[0]} × {GPU_CALIBRATION[1]} (the GPTQ papers').")
    seqlen = cols[1].number_input("Tokens per segment", min_value=16, max_value=loaded.max_length, step=64,
                                  key="calib_seqlen")
    group = cols[2].selectbox("Group size", sorted({*GROUP_SIZES, request.group_size}), key="group_size",
                              format_func=lambda g: f"{g} columns" if g else "per output channel",
                              help="Columns per scale/zero group for the predicted errors. 128 is the common "
                                   "choice where it divides the hidden size; the embedded model (576 = 9 × 64) "
                                   "uses 64, and its Q4_1 origin makes 32 too easy.")
    blocks = cols[3].number_input("Blocks to analyze", min_value=1, max_value=n_blocks, key="max_blocks",
                                  help="Fewer than all: a quick look at the first blocks (a different analysis).")
    cols = st.columns(3)
    quantizer_errors = cols[0].checkbox("Quantizer errors", key="quantizer_errors", help=QUANTIZER_ERRORS_HELP)
    extra = cols[1].multiselect("Extra group sizes", sorted({*GROUP_SIZES, *request.extra_group_sizes}),
                                key="extra_group_sizes", help=EXTRA_GROUPS_HELP,
                                format_func=lambda g: f"{g} columns" if g else "per output channel")
    calibrate = cols[2].checkbox("Calibrate the unit", key="calibrate_unit", help=CALIBRATE_HELP)
    request = AnalysisRequest(int(samples), int(seqlen), int(group), None if blocks >= n_blocks else int(blocks),
                              quantizer_errors=quantizer_errors, extra_group_sizes=tuple(sorted(set(extra) - {group})),
                              calibrate_unit=calibrate)
    st.session_state["analysis_request"] = request
    return request


st.subheader("Sensitivity analysis")
request = analysis_controls(loaded, corpus)
key = cached_analysis_key(model_source(), corpus_spec(), request)
# The checks `aptq analyze` makes of the options, before anything starts: a refused one is one st.error, and no Start.
acceptable = checked(lambda: request.check(loaded))


def start_analysis() -> None:
    """A button callback: the job exists before the page is drawn, so this very run already shows it running."""
    store = Store(default_path())
    unit_settings = request.check(loaded)

    def work(progress: Progress) -> None:
        # The frames land in the store block by block, the unit layer by layer; the pages read them from there.
        layers, errors = analyze(loaded, corpus, request.sampling, request.settings, store=store, progress=progress)
        if unit_settings is not None:
            calibrate_unit(loaded, corpus, request.sampling, layers, errors, unit_settings, store, progress)

    jobs.start(key, "Sensitivity analysis", model_source(), work)


job = jobs.find(key)
running = job is not None and job.active
status = store_call(lambda: analysis_status(key))
complete = status is not None and status["status"] == "complete"
frames = store_call(lambda: stored_analysis(key)) if complete else None
unit_missing = request.calibrate_unit and frames is not None and \
    store_call(lambda: stored_unit(key, request, frames[0])) is None
if complete and unit_missing:
    st.info(f"Analysis stored: {describe(loaded, corpus, request)}. "
            + ("Measuring its calibrated unit, layer by layer." if running else
               "Its calibrated unit is not measured yet (or was interrupted): Start / resume measures it, keeping "
               "the layers already measured."))
elif complete:
    st.success(f"Analysis stored: {describe(loaded, corpus, request)}; {status['seconds']:.0f} s of model work on "
               f"{status['device']}. Open **Sensitivity** or **Bit budget** in the sidebar.")
elif running:
    st.info(f"Analysing: {describe(loaded, corpus, request)}. Other pages stay usable meanwhile.")
elif status is not None and not (job is not None and job.state == "failed"):
    st.warning(f"Analysis interrupted after {status['blocks_done']} of {status['n_blocks']} blocks; "
               f"Start / resume continues with the next block.")
elif status is None:
    st.info(f"Not analyzed yet: {describe(loaded, corpus, request)}.")
if not complete and not running:
    expected = store_call(lambda: expected_analysis_time(loaded, request, status["blocks_done"] if status else 0))
    measured = f"{expected.blocks_measured} block{'s' if expected.blocks_measured != 1 else ''}" if expected else ""
    st.caption(f"Expected: about {jobs.format_seconds(expected.seconds)} on {loaded.device}, at the median speed of "
               f"{measured} of this model analysed here before (proportional to the calibration tokens; our "
               f"estimate{'; the options chosen above add time it does not count' if request.costs_extra else ''})."
               if expected else
               "No block of this model has been analysed on this device yet: the first one measures its speed, and "
               "the progress bar shows the time left from then on.")
if not complete or unit_missing:
    st.button("Start / resume analysis", type="primary", disabled=running or not acceptable, on_click=start_analysis,
              help="Runs in the background; the first block also measures this machine's speed for the ETA.")
jobs.show(job)

if frames is not None:
    metric = st.selectbox("Heatmap metric", list(charts.METRIC_LABELS), format_func=charts.METRIC_LABELS.get)
    st.plotly_chart(charts.sensitivity_heatmap(frames[0], metric, separate_experts=separate_experts(frames[0])),
                    width="stretch")
    st.caption("Blocks × projections, log colour scale; hover for exact values. More on the Sensitivity page.")

st.subheader("Full-precision perplexity")
c1, c2 = st.columns(2)
seqlen = c1.number_input("Window (tokens)", min_value=16, max_value=loaded.max_length,
                         value=min(512, loaded.max_length), step=64, key="fp_seqlen")
max_tokens = c2.number_input("Tokens to evaluate", min_value=16, value=16384, step=int(seqlen), key="fp_tokens",
                             help="Non-overlapping windows from the start of the evaluation split (GPTQ protocol). "
                                  "~500 tokens/s on 2 CPU cores.")
fp_prefix = f"fp:{model_source()}:{corpus_spec()}:"  # job keys: the results shown belong to this model and corpus
model_fp = cached_model_fingerprint(model_source())


def measure_perplexity() -> None:
    """A button callback (the job shows as running in this very run); the result is stored as a baseline."""
    window, tokens = int(st.session_state["fp_seqlen"]), int(st.session_state["fp_tokens"])
    store = Store(default_path())

    def measure(progress: Progress) -> Evaluation:
        windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), window, tokens)
        result = evaluate(loaded.model, windows, progress=progress, device=loaded.device)
        history.record_baseline(store, model_fp, corpus.name, result.seqlen, result.tokens, result.perplexity,
                                result.tokens_per_second)
        return result

    fp_key = f"{fp_prefix}{window}:{tokens}"
    jobs.start(fp_key, "Full-precision perplexity", model_source(), measure)
    st.session_state["fp_jobs"] = [fp_key] + [k for k in st.session_state.get("fp_jobs", []) if k != fp_key]


st.button("Measure perplexity", on_click=measure_perplexity)
for fp_key in [k for k in st.session_state.get("fp_jobs", []) if k.startswith(fp_prefix)]:
    fp_job = jobs.find(fp_key)
    if fp_job is not None and fp_job.state == "finished":
        result = fp_job.result
        st.success(f"Perplexity **{result.perplexity:.3f}** on {corpus.name} evaluation split, window {result.seqlen}, "
                   f"{result.tokens} predicted tokens ({result.tokens_per_second:.0f} tokens/s); stored.")
    else:
        jobs.show(fp_job)
baselines = store_call(lambda: history.stored_baselines(Store(), model_fp))
if baselines is not None and not baselines.empty:
    st.caption("Stored full-precision perplexities of this model (the Trade-offs page draws them as baselines):")
    st.dataframe(baselines[baselines["corpus"] == corpus.name][["perplexity", "eval_seqlen", "eval_tokens",
                                                                 "tokens_per_second", "created"]],
                 hide_index=True, column_config={"eval_seqlen": "window", "eval_tokens": "tokens",
                                                 "tokens_per_second": "tokens/s", "perplexity": st.column_config.
                                                 NumberColumn("perplexity", format="%.3f")})

write_url()
