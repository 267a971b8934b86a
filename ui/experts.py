"""The experts toggle of the heatmaps: a mixture's experts as rows of their own, or aggregated per projection type."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from aptq import charts


def separate_experts(layers: pd.DataFrame) -> bool:
    """True (one row per expert) unless the user turns the toggle off; the toggle shows only for a mixture."""
    if np.isnan(charts.expert_numbers(layers)).all():
        return True
    return st.toggle("One heatmap row per expert", value=True, key="separate_experts",
                     help="Off: each block's experts share their projection type's row — sensitivity shows their "
                          "mean (hover: min and max), plans the width most of them have (a cross where they differ; "
                          "selecting the cell selects all of them).")
