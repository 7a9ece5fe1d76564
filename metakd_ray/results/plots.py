"""Figures (matplotlib's object API with the Agg canvas: no pyplot global state, no display needed): the
data-scarcity curve (paper Fig. 3) and the gamma2 curve (Fig. 4), with the tables behind them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from metakd_ray.results.load import as_cells, sample_std
from metakd_ray.storage import Storage


def write(dest: Any, data: bytes) -> str:
    """Write ``data`` to ``dest``: a local path, a URI, or (internally) a (Storage, relative path) pair."""
    if isinstance(dest, tuple):
        st, name = dest
        st.write_bytes(data, name)
        return st.uri(name)
    out = str(dest)
    if "://" in out:
        root, name = out.rsplit("/", 1)
        Storage(root).write_bytes(data, name)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)
    return out


def _save_png(fig, out_png: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write(out_png, buf.getvalue())


def _line_plot(curves: pd.DataFrame, x: str, y: str, err: str, xlabel: str, ylabel: str, title: str, out_png: Any,
               xscale: tuple = ("linear",), empty_note: str = "") -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for dom, g in curves.groupby("domain", sort=False):
        g = g.sort_values(x)
        mean = dom == "mean"
        ax.errorbar(g[x], g[y], yerr=g[err], label=str(dom), marker="o", capsize=3,
                    linewidth=2.5 if mean else 1.2, color="black" if mean else None, zorder=3 if mean else 2)
    if y == "improvement":
        ax.axhline(0.0, color="grey", linewidth=0.8)
    if curves.empty:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale(xscale[0], **dict(xscale[1:]))
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save_png(fig, out_png)


SCARCITY_BASE, SCARCITY_OURS = "single/tinybert_kd", "meta/meta_kd"  # the methods the scarcity curve compares


def scarcity_curve(df: pd.DataFrame, out_png: Any = None, base: str = SCARCITY_BASE,
                   ours: str = SCARCITY_OURS) -> pd.DataFrame:
    """Improvement rate (acc_ours - acc_base) / acc_base per domain and sample rate (paper Fig. 3).

    Computed per seed on the cells' test_acc (both cells "ok"), then mean and sample std over seeds. The
    ``domain == "mean"`` rows average the domains' rates per seed first, then over seeds. With a gamma2 axis, a
    method's cells are averaged over it. Columns: domain, rate, improvement, improvement_std, n_seeds, acc_base,
    acc_ours (means over seeds). Writes the plot to ``out_png`` when given.
    """
    c = as_cells(df)
    c = c[(c["status"] == "ok") & c["method"].isin([base, ours])]
    cols = ["domain", "rate", "improvement", "improvement_std", "n_seeds", "acc_base", "acc_ours"]
    wide = c.pivot_table(index=["domain", "rate", "seed"], columns="method", values="test_acc", aggfunc="mean")
    if base in wide and ours in wide:
        wide = wide[[base, ours]].dropna().rename(columns={base: "acc_base", ours: "acc_ours"}).reset_index()
        wide["improvement"] = (wide["acc_ours"] - wide["acc_base"]) / wide["acc_base"]
    else:
        wide = pd.DataFrame(columns=["domain", "rate", "seed", "acc_base", "acc_ours", "improvement"])
    mean = wide.groupby(["rate", "seed"], as_index=False)[["acc_base", "acc_ours", "improvement"]].mean()
    mean["domain"] = "mean"
    per_seed = pd.concat([wide, mean], ignore_index=True) if len(wide) else wide
    rows = []
    for (dom, rate), g in per_seed.groupby(["domain", "rate"], sort=False):
        rows.append({"domain": dom, "rate": float(rate), "improvement": float(g["improvement"].mean()),
                     "improvement_std": sample_std(g["improvement"]), "n_seeds": int(g["seed"].nunique()),
                     "acc_base": float(g["acc_base"].mean()), "acc_ours": float(g["acc_ours"].mean())})
    out = pd.DataFrame(rows, columns=cols)
    if out_png is not None:
        plot = out.assign(improvement=100 * out["improvement"], improvement_std=100 * out["improvement_std"])
        _line_plot(plot, "rate", "improvement", "improvement_std", "sample rate (log scale)",
                   f"improvement rate of {ours} over {base} (%)", "Data scarcity (mean ± std over seeds)", out_png,
                   xscale=("log",), empty_note=f"no finished ({base}, {ours}) cell pairs yet")
    return out


def gamma2_curve(df: pd.DataFrame, out_png: Any = None, method: str = "meta/meta_kd") -> pd.DataFrame:
    """Test accuracy against the gamma2 axis (paper Fig. 4), per domain and averaged over domains; mean and
    sample std over seeds, at each sample rate present (the plot uses the largest). Columns: domain, rate,
    gamma2, acc, acc_std, n_seeds."""
    c = as_cells(df)
    c = c[(c["status"] == "ok") & (c["method"] == method) & c["gamma2"].notna()]
    cols = ["domain", "rate", "gamma2", "acc", "acc_std", "n_seeds"]
    mean = c.groupby(["rate", "gamma2", "seed"], as_index=False)["test_acc"].mean().assign(domain="mean")
    per_seed = pd.concat([c[["domain", "rate", "gamma2", "seed", "test_acc"]], mean], ignore_index=True) \
        if len(c) else c
    rows = [{"domain": d, "rate": float(r), "gamma2": float(g2), "acc": float(g["test_acc"].mean()),
             "acc_std": sample_std(g["test_acc"]), "n_seeds": int(g["seed"].nunique())}
            for (d, r, g2), g in per_seed.groupby(["domain", "rate", "gamma2"], sort=False)]
    out = pd.DataFrame(rows, columns=cols)
    if out_png is not None:
        top = out[out["rate"] == out["rate"].max()] if len(out) else out
        plot = top.assign(acc=100 * top["acc"], acc_std=100 * top["acc_std"])
        rate = f" at rate {top['rate'].iloc[0]:g}" if len(top) else ""
        _line_plot(plot, "gamma2", "acc", "acc_std", "gamma2 (weight of the transferable-knowledge loss)",
                   "test accuracy (%)", f"{method}: accuracy vs gamma2{rate}", out_png,
                   xscale=("symlog", ("linthresh", 0.1)), empty_note="no finished gamma2 cells yet")
    return out
