"""Figures as PNG files, drawn with matplotlib's Agg canvas (no display, no global backend switch).

Generic on purpose, so every method draws its curves the same way:

- `plot_curves`: several labelled curves y(x), optional confidence bands, log or linear x axis
  (pass@k vs k, accuracy vs compute, ...);
- `plot_calibration`: a reliability diagram, mean predicted probability vs observed frequency
  per bin, with the diagonal and the bin counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _new_figure(size: tuple[float, float] = (6.0, 4.2)) -> Figure:
    figure = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, xlabel: str = "k",
                ylabel: str = "pass@k", title: str = "", log_x: bool = True) -> Path:
    """One line per label from ``{"x": [...], "y": [...]}``; ``"lower"``/``"upper"`` add a shaded band.

    With ``log_x`` the x axis is log base 2 and ticks sit at the x values themselves (1, 2, 4, ...).
    """
    if not curves:
        raise ValueError("plot_curves: no curves to draw")
    figure = _new_figure()
    axes = figure.add_subplot()
    all_x: set[float] = set()
    for label, curve in curves.items():
        x, y = list(curve["x"]), list(curve["y"])
        if len(x) != len(y):
            raise ValueError(f"plot_curves: curve {label!r} has {len(x)} x values and {len(y)} y values")
        (line,) = axes.plot(x, y, marker="o", markersize=3, label=label)
        if "lower" in curve and "upper" in curve:
            axes.fill_between(x, curve["lower"], curve["upper"], color=line.get_color(), alpha=0.2, linewidth=0)
        all_x.update(x)
    if log_x:
        axes.set_xscale("log", base=2)
        ticks = sorted(all_x)
        axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_calibration(mean_predicted: Sequence[float], fraction_positive: Sequence[float], path: str | Path, *,
                     counts: Sequence[int] | None = None, title: str = "", xlabel: str = "mean predicted probability",
                     ylabel: str = "observed frequency") -> Path:
    """Reliability diagram: points per probability bin against the diagonal of perfect calibration."""
    if len(mean_predicted) != len(fraction_positive):
        raise ValueError("plot_calibration: mean_predicted and fraction_positive differ in length")
    figure = _new_figure((5.0, 5.0))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axes.plot(mean_predicted, fraction_positive, marker="o", label="model")
    if counts is not None:
        for x, y, count in zip(mean_predicted, fraction_positive, counts):
            axes.annotate(str(count), (x, y), textcoords="offset points", xytext=(4, -10), fontsize="x-small")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")
    return _save(figure, path)


def plot_intervals(rows: Sequence[tuple[str, float, float, float]], path: str | Path, *, xlabel: str,
                   title: str = "") -> Path:
    """One horizontal bar per (label, value, low, high) with its interval as an error bar, and a line at 0
    (paired differences: a bar whose interval crosses the line shows no winner)."""
    if not rows:
        raise ValueError("plot_intervals: no rows to draw")
    figure = _new_figure((6.4, 0.45 * len(rows) + 1.6))
    axes = figure.add_subplot()
    labels, values = [row[0] for row in rows], [row[1] for row in rows]
    errors = [[max(0.0, row[1] - row[2]) for row in rows], [max(0.0, row[3] - row[1]) for row in rows]]
    positions = range(len(rows))
    axes.barh(positions, values, xerr=errors, color="#4c72b0", alpha=0.8, capsize=3)
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    return _save(figure, path)


def plot_flow(steps: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Boxes left to right joined by arrows: a pipeline's phases."""
    figure = _new_figure((1.9 * len(steps), 1.6))
    axes = figure.add_subplot()
    axes.set_xlim(0, len(steps))
    axes.set_ylim(0, 1)
    axes.axis("off")
    for index, text in enumerate(steps):
        axes.text(index + 0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True,
                  bbox={"boxstyle": "round", "facecolor": "#dde6f3", "edgecolor": "#4c72b0"})
        if index:
            axes.annotate("", xy=(index + 0.08, 0.5), xytext=(index - 0.08, 0.5),
                          arrowprops={"arrowstyle": "->"})
    axes.set_title(title)
    return _save(figure, path)
