"""The report as a text table (for the terminal) and as a PNG (drift per layer + quality/cost), for EvalReport.

matplotlib is optional: ``pip install 'edgert[eval]'`` (or ``pip install matplotlib``) for ``--plot``.
"""
from __future__ import annotations

import math
import os

from ..errors import EdgertError, InvalidArgumentError


def _f(v, spec=".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return format(v, spec)
    return str(v)


def format_table(rep) -> str:
    lines = [f"reference: {rep.reference.label}", f"candidate: {rep.candidate.label}", ""]
    m, lim = rep.metrics, rep.thresholds
    from .thresholds import TABLES

    table = TABLES[rep.kind]
    failed = {f.metric for f in rep.failures}
    lines.append(f"{'metric':<20} {'value':>12}  {'threshold':<14} status")
    for k, v in m.items():
        if isinstance(v, (dict, list)):
            continue
        t = table.get(k)
        thr = "" if t is None or lim.get(k) is None else f"{t.direction} {_f(lim[k])}"
        status = "" if not thr else ("FAIL" if k in failed else "ok")
        lines.append(f"{k:<20} {_f(v):>12}  {thr:<14} {status}")
    lines.append("")
    keys = [k for k in rep.sides["reference"] if k not in ("label",)]
    lines.append(f"{'':<26} {'reference':>16} {'candidate':>16}")
    for k in keys:
        a, b = rep.sides["reference"].get(k), rep.sides["candidate"].get(k)
        lines.append(f"{k:<26} {_f(a):>16} {_f(b):>16}")
    if rep.first_divergence:
        lines.append("")
        lines.append(f"first divergence: {rep.first_divergence}")
    if rep.failures:
        lines.append("")
        lines.append("failures: " + "; ".join(rep.failures))
    lines.append("")
    lines.append(rep.verdict)
    return "\n".join(lines)


MATPLOTLIB_MISSING = ("--plot needs matplotlib: pip install 'edgert[eval]' (or pip install matplotlib)")


def check_plot_path(path) -> None:
    """Refuse a plot matplotlib cannot write (it is not installed, or has no format for the file's extension) before
    the evaluation: savefig's ValueError came after all of it. No extension: savefig writes PNG."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise EdgertError(MATPLOTLIB_MISSING) from None
    ext = os.path.splitext(os.fspath(path))[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in formats:
        raise InvalidArgumentError(f"cannot write the plot {os.fspath(path)}: matplotlib has no .{ext} format; name "
                                   f"the file with one of {', '.join(sorted(formats))} (e.g. drift.png)")


SQNR_CAP = 120.0  # where an identical tensor's inf SQNR is drawn


def _sqnr_bars(rows) -> tuple[list[float], float]:
    """Bar heights for the rows' SQNR and the axis floor, where -inf, nan (nothing measured) and an exactly
    compared output that differs are drawn (a first divergence there drew no bar at all)."""
    finite = [r["sqnr_db"] for r in rows if math.isfinite(r.get("sqnr_db", math.nan))]
    floor = min([0.0, *finite]) - 10.0
    out = []
    for r in rows:
        v = r["sqnr_db"] if "sqnr_db" in r else (math.inf if r.get("mismatch_pct") == 0 else -math.inf)
        out.append(SQNR_CAP if v == math.inf else v if math.isfinite(v) else floor)
    return out, floor


def plot_report(rep, path) -> str:
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    rows = rep.tensors
    names = [r["name"] for r in rows]
    shown, floor = _sqnr_bars(rows)
    xs = range(len(rows))
    colors = ["tab:red" if n == rep.first_divergence else "tab:blue" for n in names]
    ax1.bar(xs, shown, color=colors)
    ax1.set_ylim(bottom=floor)
    lim = rep.thresholds.get("sqnr_db") if rep.kind == "graph" else None
    if lim is not None:
        ax1.axhline(lim, color="tab:red", ls="--", lw=1, label=f"sqnr_db threshold {lim:g}")
        ax1.legend(loc="upper right", fontsize=8)
    what = "tensor (topological order)" if rep.kind == "graph" else "weight tensor (compute order)"
    ax1.set_title(f"drift per layer: SQNR vs reference ({SQNR_CAP:g} = identical; {floor:g} = -inf or not measured)")
    ax1.set_xlabel(what)
    ax1.set_ylabel("SQNR (dB)")
    if len(rows) <= 40:
        ax1.set_xticks(list(xs))
        ax1.set_xticklabels(names, rotation=75, fontsize=7)
    if not rows:
        ax1.text(0.5, 0.5, "no shared tensors", ha="center", va="center", transform=ax1.transAxes)

    s_r, s_c = rep.sides["reference"], rep.sides["candidate"]
    if rep.kind == "llm":
        q = [rep.metrics["ppl_reference"], rep.metrics["ppl_candidate"]]
        qlab = "perplexity"
        ckey = "cost_usd_per_1m_tokens" if s_r["cost_usd_per_1m_tokens"] > 0 else "energy_wh_per_1m_tokens"
    else:
        q = [1.0, rep.metrics.get("cosine", float("nan"))]
        qlab = "output cosine (worst)"
        ckey = "cost_usd_per_1k" if s_r.get("cost_usd_per_1k", 0) > 0 else "energy_wh_per_1k"
    c = [s_r.get(ckey, float("nan")), s_c.get(ckey, float("nan"))]
    ax2.bar([0, 1], c, color=["tab:gray", "tab:green" if rep.passed else "tab:red"])
    ax2.set_xticks([0, 1])
    ax2.set_xticklabels(["reference", "candidate"])
    ax2.set_ylabel(ckey)
    ax3 = ax2.twinx()
    ax3.plot([0, 1], q, "ko-")
    ax3.set_ylabel(qlab)
    ax2.set_title("quality / cost", fontsize=10)
    fig.suptitle(rep.verdict, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:  # a missing directory, no permission: the caller's path, named
        raise InvalidArgumentError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    except (ValueError, RuntimeError) as exc:  # what savefig refuses past check_plot_path (pgf without LaTeX...)
        raise InvalidArgumentError(f"cannot write the plot {path}: {exc}") from None
    finally:
        plt.close(fig)
    return str(path)
