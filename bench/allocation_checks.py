"""Two checks of why mixed plans measure dearer than their predictions promise (issue 17), for bench_allocation.

1. **Multiples fitted to every plan.** The grid multiples are measured on uniform plans alone. Here each plan's
   prediction is split by grid (group size, bits) and one multiple per grid is fitted to the validation KL of all the
   other plans at once (non-negative least squares on relative errors), then the left-out mixed plan is predicted. If
   the mixed plans' shortfall were a per-grid scale that the uniform plans mismeasure, the fitted multiples would
   predict it.
2. **Selection bias of the unit's noise.** The knapsack prefers layers whose predicted cost looks low, and where the
   estimate is noisy it prefers, among them, those it underestimates. Taking the unit's measured values as the truth,
   each draw perturbs them by their standard errors, plans on the perturbed values with the same request, and compares
   the truth's total for that plan with what the perturbed values promised: the bias that noise of this size makes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from aptq.allocate import UNIT_COLUMNS, Plan, allocate, layer_predictions, plan_frame, summarize
from aptq.choices import PAIRS_SOLVER

DRAWS = 40  # perturbed unit tables per knapsack plan (our choice: the mean's spread below 1 %)


def grid_terms(plan: Plan, layers: pd.DataFrame, errors: pd.DataFrame, metric: str) -> dict[tuple[int, int], float]:
    """The plan's predicted error (its request's unit and multiples) summed per grid: (group size, bits) → total."""
    frame = plan_frame(plan, layers).assign(value=layer_predictions(plan, layers, errors, metric)[0])
    quantized = frame[frame["value"] > 0]
    return {(int(g), int(b)): float(v) for (g, b), v in quantized.groupby(["group", "bits"])["value"].sum().items()}


def fitted_multiples_lines(table: pd.DataFrame, unpriced: dict[str, Plan], layers: pd.DataFrame,
                           errors: pd.DataFrame, metric: str, unit: str) -> list[str]:
    """Check 1 in `unit`: `unpriced` holds each distinct plan (by the table's plan column) scored in `unit` without
    multiples; the table's `{unit}_multiplied` column is the prediction with the uniform plans' multiples."""
    distinct = table.drop_duplicates("plan").reset_index(drop=True)
    terms = [grid_terms(unpriced[plan], layers, errors, metric) for plan in distinct["plan"]]
    grids = sorted({grid for plan_terms in terms for grid in plan_terms})
    X = np.array([[plan_terms.get(grid, 0.0) for grid in grids] for plan_terms in terms])
    y = distinct["kl_validation"].to_numpy(dtype=float)
    weights = 1 / y  # relative errors: the small KLs of 4-bit plans count as much as the large ones of 2-bit plans
    fitted, _ = nnls(X * weights[:, None], y * weights)
    mixed = ~distinct["method"].str.startswith("uniform")
    lines = [f"### Multiples fitted to every plan ({unit} unit)", "",
             "Fitted to all " + str(len(distinct)) + " plans' validation KL: "
             + ", ".join(f"{'per channel' if g == 0 else f'g{g}'} {b}-bit {m:.3f}" for (g, b), m in zip(grids, fitted)),
             "", "| method | budget | multiples | KL validation | measured / predicted, uniform plans' multiples | "
             "measured / predicted, fitted to the other plans |", "|---|---|---|---|---|---|"]
    loo_ratios, uniform_ratios = [], []
    for index in np.flatnonzero(mixed.to_numpy()):
        others = np.arange(len(y)) != index
        left_out, _ = nnls(X[others] * weights[others, None], y[others] * weights[others])
        row = distinct.iloc[index]
        loo_ratios.append(y[index] / float(X[index] @ left_out))
        uniform_ratios.append(y[index] / row[f"{unit}_multiplied"])
        lines.append(f"| {row['method']} | {row['budget']:g} | {'yes' if row['multiplied'] else 'no'} | "
                     f"{y[index]:.4f} | {uniform_ratios[-1]:.3f} | {loo_ratios[-1]:.3f} |")
    lines += ["", f"Mean |log(measured / predicted)| over the {int(mixed.sum())} mixed plans: "
              f"{np.abs(np.log(uniform_ratios)).mean():.3f} with the uniform plans' multiples, "
              f"{np.abs(np.log(loo_ratios)).mean():.3f} with multiples fitted to the other plans.", ""]
    return lines


def selection_bias_lines(table: pd.DataFrame, plans: dict[str, Plan], layers: pd.DataFrame, errors: pd.DataFrame,
                         seed: int = 0) -> list[str]:
    """Check 2 for every knapsack plan of the table (`plans` by the table's plan column, as allocated)."""
    lines = ["### Selection bias of the unit's noise", "",
             f"{DRAWS} draws per plan: the unit's values perturbed by their standard errors (normal, kept positive), "
             "the plan made again on them; truth / promise is the plan's total with the unit as measured over its "
             "total with the perturbed one (1: no bias).", "",
             "| method | budget | unit | multiples | layers moved (mean) | truth / promise: mean | 5 % | 95 % |",
             "|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(seed)
    knapsacks = table[table["method"].isin(["knapsack", PAIRS_SOLVER])].drop_duplicates("plan")
    for row in knapsacks.itertuples():
        plan = plans[row.plan]
        value, spread, *_ = UNIT_COLUMNS[plan.request.unit]
        chosen = plan_frame(plan, layers)[["bits", "group"]]
        ratios, moved = [], []
        for _ in range(DRAWS):
            noisy = layers.copy()
            noisy[value] = np.clip(layers[value] + rng.standard_normal(len(layers)) * layers[spread],
                                   1e-3 * layers[value].abs(), None)
            redrawn = allocate(noisy, errors, plan.request)
            promise = summarize(redrawn, noisy, errors)["predicted_error_attention"]
            ratios.append(summarize(redrawn, layers, errors)["predicted_error_attention"] / promise)
            moved.append(int((plan_frame(redrawn, layers)[["bits", "group"]] != chosen).any(axis=1).sum()))
        lines.append(f"| {row.method} | {row.budget:g} | {row.unit} | {'yes' if row.multiplied else 'no'} | "
                     f"{np.mean(moved):.1f} | {np.mean(ratios):.3f} | {np.percentile(ratios, 5):.3f} | "
                     f"{np.percentile(ratios, 95):.3f} |")
    return lines + [""]
