"""`SpectralDensity.plot`: the default figure, saved as it is, shows all of its labels."""

from __future__ import annotations

import io

import numpy as np
import pytest

from curvops.algorithms import spectral_density

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _inside(bbox, figure_bbox) -> bool:
    return (
        bbox.x0 >= figure_bbox.x0
        and bbox.y0 >= figure_bbox.y0
        and bbox.x1 <= figure_bbox.x1
        and bbox.y1 <= figure_bbox.y1
    )


@pytest.mark.parametrize("log_scale", [True, False])
def test_saved_default_figure_keeps_labels_and_title_inside(make_spectrum_matrix, log_scale: bool) -> None:
    """Saved with plain ``savefig`` (no ``bbox_inches="tight"``), the x-label, y-label and
    title of the default figure lie inside the image."""
    matrix = make_spectrum_matrix(np.r_[np.linspace(0.0, 1.0, 37), 5.0, 8.0, 9.0], seed=6)[0]
    result = spectral_density(matrix, num_probes=4, lanczos_steps=10, seed=0)
    ax = result.plot(log_scale=log_scale)
    figure = ax.figure
    try:
        figure.savefig(io.BytesIO(), format="png")  # runs the layout as a file save does
        renderer = figure.canvas.get_renderer()
        for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
            assert text.get_text()
            bbox = text.get_window_extent(renderer)
            assert _inside(bbox, figure.bbox), (text.get_text(), bbox, figure.bbox)
        # Everything the axes draw: tick labels, labels, title.
        assert _inside(ax.get_tightbbox(renderer), figure.bbox)
    finally:
        plt.close(figure)


def test_given_axes_keep_their_figure_layout(make_spectrum_matrix) -> None:
    """An axes passed in is drawn on, its figure's layout left as the caller chose it."""
    matrix = make_spectrum_matrix(np.linspace(0.0, 1.0, 20), seed=1)[0]
    result = spectral_density(matrix, num_probes=2, lanczos_steps=8, seed=0)
    figure, ax = plt.subplots()
    try:
        assert result.plot(ax) is ax
        assert figure.get_layout_engine() is None
    finally:
        plt.close(figure)
