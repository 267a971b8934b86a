"""Chart layouts that the browser tests cannot cover case by case: the labels of log axes over many ranges."""

from __future__ import annotations

import numpy as np
import pytest

from aptq import charts


def test_log_axis_labels_are_few_whole_values_inside_the_range():
    """Over ranges from a tenth of a decade to thirty decades: every label is the value at its tick, inside the drawn
    range, at most eight of them, in 1-2-5 steps (up to 2.5 decades), 1-3 steps (up to 3.5) or powers of ten; a
    range too narrow for two such values keeps plotly's own labels."""
    for low in np.linspace(-3.0, 3.0, 13):
        for decades in (0.1, 0.3, 0.5, 1.0, 1.7, 2.5, 2.6, 3.3, 4.0, 7.3, 12.0, 30.0):
            axis = charts.log_axis([[10 ** low, 10 ** (low + decades)]])
            start, end = axis["range"]
            if "tickvals" not in axis:
                assert sum(start <= np.log10(m * 10.0 ** e) <= end for e in range(-6, 40) for m in (1, 2, 5)) < 2
                continue
            ticks = np.array(axis["tickvals"])
            assert 2 <= len(ticks) <= 8 and np.all(np.diff(ticks) > 0)
            assert np.all((np.log10(ticks) >= start) & (np.log10(ticks) <= end))
            assert [float(text.replace(",", "")) for text in axis["ticktext"]] == pytest.approx(list(ticks))
            mantissas = {round(t / 10.0 ** np.floor(np.log10(t) + 1e-9), 6) for t in ticks}
            span = end - start
            assert mantissas <= ({1.0, 2.0, 5.0} if span <= 2.5 else {1.0, 3.0} if span <= 3.5 else {1.0})


def test_log_axis_without_positive_values_is_left_to_plotly():
    assert charts.log_axis([[0.0, -1.0, None, float("nan")]]) == {"type": "log"}
