"""`cachekit report`: a markdown report with tables and accuracy-vs-shots plots from result lines."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CachekitError


def read_results(path) -> list[dict]:
    """JSON lines; a torn last line (a run killed mid-write) is ignored."""
    p = Path(path)
    if not p.is_file():
        raise CachekitError(f"results file {p} does not exist; fix: write one with `cachekit eval --out` "
                            "or `cachekit sweep --out`")
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise CachekitError(f"{p} line {i} is not JSON; fix: remove or repair that line") from None
    if not out:
        raise CachekitError(f"{p} holds no results; fix: run `cachekit eval --out {p}` first")
    return out


def _label(r: dict) -> str:
    tag = r.get("tag")
    return f"{r['method']} [{tag}]" if tag else r["method"]


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def build_report(records: list[dict], out_dir, plots: bool = True) -> dict:
    """Write report.md (and accuracy_vs_shots.png when matplotlib is installed) into out_dir."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = list(dict.fromkeys(r.get("dataset", "?") for r in records))
    lines = ["# cachekit report", ""]
    weights = sorted({r.get("weights", "") for r in records})
    lines += [f"- weights: {w}" for w in weights]
    sel = sorted({r.get("selection", "val") for r in records})
    lines += [f"- hyper-parameters chosen on: {', '.join(sel)}", f"- runs: {len(records)}", ""]
    series: dict = {}
    for ds in datasets:
        recs = [r for r in records if r.get("dataset", "?") == ds]
        labels = list(dict.fromkeys(_label(r) for r in recs))
        shots = sorted({r["shots"] for r in recs})
        rows = []
        for lab in labels:
            row = [lab]
            for k in shots:
                v = [r["metrics"]["test_acc"] for r in recs if _label(r) == lab and r["shots"] == k
                     and r["metrics"].get("test_acc") is not None]
                row.append(f"{np.mean(v):.2f} ± {np.std(v):.2f} (n={len(v)})" if v else "-")
                if v:
                    series.setdefault(ds, {}).setdefault(lab, []).append((k, float(np.mean(v)), float(np.std(v))))
            rows.append(row)
        lines += [f"## {ds}", "", "Test accuracy (%), mean ± std over seeds.", "",
                  md_table(["method"] + [f"{k}-shot" for k in shots], rows), ""]
    png = None
    if plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            lines += ["(plots skipped: install the `report` extra, i.e. matplotlib)", ""]
        else:
            n = len(series)
            fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 3.8), squeeze=False)
            for ax, (ds, by) in zip(axes[0], series.items()):
                for lab, pts in by.items():
                    pts.sort()
                    ks, m, s = zip(*pts)
                    ax.errorbar(ks, m, yerr=s, marker="o", capsize=3, label=lab)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("shots per class")
                ax.set_ylabel("test accuracy (%)")
                ax.set_title(ds)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            png = out / "accuracy_vs_shots.png"
            fig.savefig(png, dpi=110)
            plt.close(fig)
            lines += ["![accuracy vs shots](accuracy_vs_shots.png)", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return {"report": str(md), "plot": str(png) if png else None, "runs": len(records), "datasets": datasets}
