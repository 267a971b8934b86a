"""How two sensitivity measures order the layers: rank correlation and the layers whose rank moves the most."""

from __future__ import annotations

import pandas as pd


def ranks(layers: pd.DataFrame, metric: str) -> pd.Series:
    """1 = the most sensitive layer under `metric`; ties share their mean rank."""
    return layers[metric].rank(ascending=False)


def spearman(layers: pd.DataFrame, x_metric: str, y_metric: str) -> float:
    """Spearman rank correlation of two per-layer metrics (Pearson correlation of their ranks)."""
    return float(ranks(layers, x_metric).corr(ranks(layers, y_metric)))


def rank_shifts(layers: pd.DataFrame, x_metric: str, y_metric: str, n: int = 12) -> pd.DataFrame:
    """The `n` layers whose rank differs most between the metrics: layer, rank_x, rank_y, shift = rank_x − rank_y
    (positive: more sensitive under `y_metric` than under `x_metric`), biggest moves first."""
    moved = pd.DataFrame({"layer": layers["layer"], "rank_x": ranks(layers, x_metric),
                          "rank_y": ranks(layers, y_metric)})
    moved = moved.assign(shift=moved["rank_x"] - moved["rank_y"])
    order = moved["shift"].abs().sort_values(ascending=False, kind="stable").index
    return moved.loc[order].head(n).reset_index(drop=True)
