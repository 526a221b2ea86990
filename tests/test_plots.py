"""objective.png: the chains' objective with the random start's and the all-in-one merge's levels
as labelled lines, and the axis saying that lower is better."""

from __future__ import annotations

import numpy as np

from d2c_jax import plots


def test_objective_plot_draws_the_reference_levels_as_labelled_lines():
    metrics = [{"iteration": i, "objectives": [20.0 - i, 21.0 - i]} for i in range(0, 10, 2)]
    fig = plots.objective_figure(metrics, random_start=20.5524, all_in_one=23.446)
    ax = fig.axes[0]
    levels = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    assert np.allclose(levels["random start 20.55"], 20.5524) and np.allclose(levels["all-in-one merge 23.45"], 23.446)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["chain 0 (best)", "random start 20.55", "all-in-one merge 23.45"]
    assert "lower is better" in ax.get_ylabel()
    plots.pyplot().close(fig)
    assert plots.objective_png(metrics, random_start=None, all_in_one=None)[:4] == b"\x89PNG"
