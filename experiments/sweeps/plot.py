"""A sweep's parallel-coordinates plot: one vertical axis per swept parameter and one for the chosen
metric, one line per trial coloured by that metric (Omniboard has no such view).

Numeric parameters keep their scale (a log scale when they span more than a factor of 20 and are
positive); other values (names, booleans, lists) are placed at evenly spaced ticks in the order they
first appear. Trials without the metric (failed ones) are left out and counted in the title.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from pqa_core.errors import PqaError
from pqa_core.storage.atomic import atomic_file


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def axis_positions(values: Sequence[Any]) -> Dict[str, Any]:
    """Where each value sits on its axis, in [0, 1], and the tick labels: ``{positions, ticks, labels, log}``."""
    if values and all(_is_number(v) for v in values):
        low, high = min(values), max(values)
        log = low > 0 and high / low > 20
        f = (lambda v: math.log10(v)) if log else (lambda v: float(v))
        span = f(high) - f(low)
        positions = [0.5 if span == 0 else (f(v) - f(low)) / span for v in values]
        ticks = sorted(set(values))
        if len(ticks) > 6:
            ticks = [low, high]
        return {"positions": positions, "ticks": [0.5 if span == 0 else (f(t) - f(low)) / span for t in ticks],
                "labels": [f"{t:.3g}" for t in ticks], "log": log}
    order: List[str] = []
    for value in values:
        if repr(value) not in order:
            order.append(repr(value))
    slot = {text: (0.5 if len(order) == 1 else i / (len(order) - 1)) for i, text in enumerate(order)}
    return {"positions": [slot[repr(v)] for v in values], "ticks": [slot[t] for t in order],
            "labels": [t.strip("'") for t in order], "log": False}


def parallel_coordinates(rows: Sequence[Dict[str, Any]], params: Sequence[str], metric: str, path, title: str = ""):
    """Write the plot of ``rows`` (``{"params": {...}, "metrics": {...}}``) to ``path`` (PNG), atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PqaError("the parallel-coordinates plot needs matplotlib: pip install 'pqa[sweep]'") from None
    scored = [r for r in rows if _is_number(r["metrics"].get(metric))]
    if not scored:
        raise PqaError(f"no trial of this sweep has metric {metric!r} to plot")
    axes_names = list(params) + [metric]
    columns = [[r["params"].get(p) for r in scored] for p in params] + [[r["metrics"][metric] for r in scored]]
    layout = [axis_positions(column) for column in columns]
    metric_values = columns[-1]
    low, high = min(metric_values), max(metric_values)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.9 * len(axes_names)), 4.6))
    for i, row_value in enumerate(metric_values):
        shade = 0.5 if high == low else (row_value - low) / (high - low)
        ax.plot(range(len(axes_names)), [axis["positions"][i] for axis in layout], "-o", color=cmap(shade),
                alpha=0.85, linewidth=1.6, markersize=3)
    for x, (name, axis) in enumerate(zip(axes_names, layout)):
        ax.axvline(x, color="0.3", linewidth=0.8)
        for tick, label in zip(axis["ticks"], axis["labels"]):
            ax.annotate(label, (x, tick), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(axes_names)))
    ax.set_xticklabels([f"{n}\n(log)" if a["log"] else n for n, a in zip(axes_names, layout)], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_names) - 0.5)
    ax.set_ylim(-0.06, 1.06)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    left_out = len(rows) - len(scored)
    ax.set_title((title + "\n" if title else "") + f"{len(scored)} trials coloured by {metric}"
                 + (f"; {left_out} without it (failed) not drawn" if left_out else ""), fontsize=9)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(low, high))
    fig.colorbar(mappable, ax=ax, label=metric, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
