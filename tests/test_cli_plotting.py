"""The training-curves figure (curves.png): built and inspected as matplotlib objects."""

from __future__ import annotations

import pathlib

from rlhf.training.plotting import curves_figure, plot_curves

CURVES = {
    "reward (0..1 feedback scale)": [0.1, 0.2, 0.35, 0.5, 0.55, 0.6, 0.62],
    "KL to reference": [0.0, 0.8, 2.1, 3.9, 5.2, 6.3, 6.1],
    "kl_coef": [0.2, 0.20004, 0.20009, 0.20015, 0.20018, 0.2002, 0.20021],
    "entropy": [],  # empty curves get no panel
}
STD = [0.05, 0.1, 0.12, 0.1, 0.08, 0.07, 0.06]


def _panels(figure):
    return {axis.get_title(): axis for axis in figure.axes if axis.get_title()}


def test_the_figure_has_labelled_axes_integer_steps_a_std_band_and_the_kl_target():
    figure = curves_figure(
        CURVES, "agent: PPO", bands={"reward (0..1 feedback scale)": STD}, targets={"KL to reference": 6.0}
    )
    figure.canvas.draw()  # tick labels are decided when drawn
    panels = _panels(figure)
    assert set(panels) == {"reward (0..1 feedback scale)", "KL to reference", "kl_coef"}
    for name, axis in panels.items():
        assert axis.get_xlabel() == "step" and axis.get_ylabel(), name
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
    assert panels["KL to reference"].get_ylabel() == "KL (nats per response)"

    # the reward's ±1 std band spans mean - std .. mean + std at each step
    reward = panels["reward (0..1 feedback scale)"]
    (band,) = reward.collections
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == min(m - s for m, s in zip(CURVES["reward (0..1 feedback scale)"], STD, strict=True))
    assert vertices[:, 1].max() == max(m + s for m, s in zip(CURVES["reward (0..1 feedback scale)"], STD, strict=True))
    assert "±1 std" in [text.get_text() for text in reward.get_legend().get_texts()]

    # the KL target is a horizontal line at 6.0
    kl = panels["KL to reference"]
    targets = [line for line in kl.get_lines() if line.get_label() == "target 6"]
    assert len(targets) == 1 and set(targets[0].get_ydata()) == {6.0} and targets[0].get_linestyle() == "--"

    # kl_coef's ticks show its values, not an offset ("+2e-1") beside tiny differences
    coef = panels["kl_coef"]
    assert coef.yaxis.get_offset_text().get_text() == ""
    labels = [label.get_text() for label in coef.get_yticklabels() if label.get_text()]
    assert labels and all(0.199 < float(label.replace("\u2212", "-")) < 0.201 for label in labels), labels


def test_without_bands_or_targets_and_saved_as_png(tmp_path: pathlib.Path):
    figure = curves_figure({"loss": [1.0, 0.5]}, "t", bands={"loss": [0.1]})  # a band of the wrong length: none
    (axis,) = [a for a in figure.axes if a.get_title()]
    assert not axis.collections and axis.get_legend() is None
    path = plot_curves(CURVES, tmp_path / "v1" / "curves.png", "t", targets={"KL to reference": 6.0})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
