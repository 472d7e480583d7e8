"""Shared helpers for conversion reports: machine description, Markdown, PNG plots.

Used by quantize, distill and prune. Plots use matplotlib's Agg backend (no
display needed) and are written next to the output; every helper takes
plain lists/dicts so the callers stay free of plotting code.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._files import json_default

__all__ = ["machine_info", "markdown_table", "write_markdown", "write_json", "plot_scatter", "plot_bars",
           "plot_lines", "fmt", "pyplot", "save_figure"]


def machine_info() -> dict:
    """Where figures were measured: CPU, cores, load, runtime versions."""
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for mod in ("onnxruntime", "ai_edge_litert", "torch"):
        try:
            from importlib.metadata import version
            info[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing/oddly packaged module only loses one line of the report
            pass
    return info


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v) or "–"
    return str(v)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """``# title`` then ``## heading`` + body for each section; written atomically."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    return _atomic_write(Path(path), "\n".join(parts))


def write_json(path, data) -> Path:
    return _atomic_write(Path(path), json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n")


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


# Public names for custom plots (distill and prune draw their own figures with these).
pyplot = _plt
save_figure = _save


def plot_scatter(path, points: Sequence[Mapping], *, x: str, y: str, label: str = "name", title: str = "",
                 xlabel: str | None = None, ylabel: str | None = None, hline: float | None = None,
                 hline_label: str = "", highlight: str | None = None) -> Path:
    """One labelled dot per point (e.g. accuracy vs latency of each candidate)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, p in enumerate(points):
        if p.get(x) is None or p.get(y) is None:
            continue
        chosen = highlight is not None and p.get(label) == highlight
        ax.scatter([p[x]], [p[y]], s=70 if chosen else 35, marker="*" if chosen else "o",
                   color="tab:red" if chosen else "tab:blue", zorder=3)
        # Candidates often tie on accuracy; stagger the labels so tied points stay readable.
        ax.annotate(str(p.get(label)), (p[x], p[y]), textcoords="offset points", xytext=(5, 4 + 10 * (i % 3)),
                    fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="tab:gray", linestyle="--", linewidth=1, label=hline_label or None)
        if hline_label:
            ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_bars(path, labels: Sequence[str], values: Sequence[float], *, title: str = "", ylabel: str = "",
              highlight: Sequence[str] = (), horizontal: bool = True, max_bars: int = 40) -> Path:
    """Bars per item (e.g. per-node error), highlighted items in red; at most ``max_bars`` shown."""
    plt = _plt()
    labels, values = list(labels)[:max_bars], list(values)[:max_bars]
    colors = ["tab:red" if lbl in set(highlight) else "tab:blue" for lbl in labels]
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.25 * len(labels) + 1)) if horizontal else (8, 4))
    if horizontal:
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="x" if horizontal else "y", alpha=0.3)
    return _save(fig, path)


def plot_lines(path, series: Mapping[str, Sequence[float]], *, x: Sequence | None = None, title: str = "",
               xlabel: str = "", ylabel: str = "") -> Path:
    """Named curves over a shared x (e.g. training losses per epoch)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ys in series.items():
        ax.plot(list(x) if x is not None else range(len(ys)), list(ys), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
