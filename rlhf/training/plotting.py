"""Training curves to PNG (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib


def plot_curves(curves: dict[str, list[float]], path: pathlib.Path, title: str) -> pathlib.Path:
    """One panel per non-empty curve, x = step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [(name, values) for name, values in curves.items() if values]
    columns = 2
    rows = max(1, (len(named) + columns - 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3.2 * rows), squeeze=False)
    for axis, (name, values) in zip(axes.flat, named, strict=False):
        axis.plot(range(1, len(values) + 1), values, linewidth=1.5)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(named) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
