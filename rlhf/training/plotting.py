"""Training curves to PNG (matplotlib, no display needed).

One panel per curve against the step (integer ticks), each axis labelled; a curve may carry a ±1 std band
(the reward's spread across a batch) and a target drawn as a dashed line (the KL target); values are shown
as they are, never as an offset (kl_coef moves in the fourth decimal).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

# The y-axis label of a curve, when its name alone does not say the unit.
Y_LABELS = {
    "reward (0..1 feedback scale)": "reward (0..1)",
    "reward-model score": "score (reward-model units)",
    "KL to reference": "KL (nats per response)",
    "kl_coef": "KL coefficient",
}


def curves_figure(
    curves: Mapping[str, Sequence[float]],
    title: str,
    bands: Mapping[str, Sequence[float]] | None = None,
    targets: Mapping[str, float] | None = None,
) -> Any:
    """The figure: one panel per non-empty curve; `bands[name]` is a ±1 std band around that curve,
    `targets[name]` a horizontal dashed line (e.g. the KL target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    bands = bands or {}
    targets = targets or {}
    named = [(name, list(values)) for name, values in curves.items() if values]
    columns = 2
    rows = max(1, (len(named) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3.2 * rows), squeeze=False)
    for axis, (name, values) in zip(axes.flat, named, strict=False):
        steps = list(range(1, len(values) + 1))
        axis.plot(steps, values, linewidth=1.5, label=name)
        std = list(bands.get(name) or [])
        if len(std) == len(values):
            low = [v - s for v, s in zip(values, std, strict=True)]
            high = [v + s for v, s in zip(values, std, strict=True)]
            axis.fill_between(steps, low, high, alpha=0.2, label="±1 std")
        if name in targets:
            axis.axhline(targets[name], color="tab:red", linestyle="--", linewidth=1, label=f"target {targets[name]:g}")
        if len(axis.get_legend_handles_labels()[0]) > 1:
            axis.legend(fontsize="small", loc="best")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_ylabel(Y_LABELS.get(name, name))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.ticklabel_format(axis="y", style="plain", useOffset=False)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(named) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: pathlib.Path,
    title: str,
    bands: Mapping[str, Sequence[float]] | None = None,
    targets: Mapping[str, float] | None = None,
) -> pathlib.Path:
    """curves_figure saved as a PNG at `path`."""
    import matplotlib.pyplot as plt

    figure = curves_figure(curves, title, bands, targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
