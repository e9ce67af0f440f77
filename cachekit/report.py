"""Summaries of result records: the one summariser, the one table renderer, and `cachekit report`.

Records are grouped by (cache build, method, configuration) and averaged over seeds only: two configurations
are two rows, two caches are two sections (even when they share a file name). `best_on_val` adds, per method
and shot count, the configuration with the best mean val accuracy, labelled as such.
"""
from __future__ import annotations

import json
from pathlib import Path

from .records import canonical

__all__ = ["summarize", "render_table", "build_report", "group_label"]


def render_table(header, rows) -> str:
    """A markdown table with padded columns (the CLI prints it, report.md embeds it)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _diff(a: dict, b: dict) -> dict:
    """Settings of `a` that differ from `b`, nested mappings compared key by key."""
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif json.dumps(v) != json.dumps(b.get(k)):
            out[k] = v
    return out


def group_label(method: str, config: dict) -> str:
    """The method, plus the fewest settings that differ from its declared defaults: a setting that the others
    imply (SAFE's warm-up follows its epochs) is left out, and so is the device."""
    from .methods.registry import get_method

    try:
        spec = get_method(method)
        diff = _diff({k: v for k, v in config.items() if k != "device"}, spec.defaults())
        for k in list(diff):
            trial = {kk: vv for kk, vv in diff.items() if kk != k}
            try:
                if _diff(spec.make_config(trial).to_dict(), config) == {} or k == "device":
                    diff = trial
            except Exception:  # noqa: BLE001 - a setting the others cannot imply stays
                pass
    except Exception:  # noqa: BLE001 - records of a method this version does not know: every setting
        diff = dict(config)
    return f"{method} {json.dumps(diff, sort_keys=True)}" if diff else method


def _groups(records: list[dict]) -> dict:
    """{(build, method, config): {"label", "runs": {(shots, seed): record}}} in first-seen order."""
    out: dict = {}
    for r in records:
        g = out.setdefault((r.get("cache_build", "?"), r["method"], canonical(r["config"])),
                           {"label": group_label(r["method"], r["config"]), "method": r["method"], "runs": {}})
        g["runs"].setdefault((r["shots"], r["seed"]), r)  # one record per seed: duplicates never count twice
    return out


def _stats(values):
    import numpy as np

    return (float(np.mean(values)), float(np.std(values)), len(values)) if values else None


def _cell(st, with_n: bool) -> str:
    if st is None:
        return "-"
    return f"{st[0]:.2f} ± {st[1]:.2f}" + (f" (n={st[2]})" if with_n else "")


def _values(g, k, metric):
    return [r["metrics"].get(metric) for (kk, _), r in sorted(g["runs"].items()) if kk == k
            and r["metrics"].get(metric) is not None]


def summarize(records: list[dict], metric: str = "test_acc", with_n: bool = False,
              best_on_val: bool = False) -> tuple[list[str], list[list[str]]]:
    """Rows: one per (cache build, method, configuration); columns: shots; cells: mean ± std over seeds."""
    groups = _groups(records)
    builds = list(dict.fromkeys(b for b, _, _ in groups))
    names = {}
    for r in records:
        names.setdefault(r.get("cache_build", "?"), r.get("dataset", "?"))
    shots = sorted({r["shots"] for r in records})
    rows = []
    for key, g in groups.items():
        prefix = f"[{names[key[0]]} {key[0][:8]}] " if len(builds) > 1 else ""
        rows.append([prefix + g["label"]] + [_cell(_stats(_values(g, k, metric)), with_n) for k in shots])
    if best_on_val:
        rows += _best_rows(groups, shots, metric, with_n, builds, names)
    return ["method"] + [f"{k}-shot" for k in shots], rows


def _best_rows(groups, shots, metric, with_n, builds, names):
    """Per (build, method) with several configurations: at each K the one with the best mean val accuracy."""
    rows = []
    by_method: dict = {}
    for key, g in groups.items():
        by_method.setdefault((key[0], key[1]), []).append(g)
    for (build, method), gs in by_method.items():
        if len(gs) < 2:
            continue
        prefix = f"[{names[build]} {build[:8]}] " if len(builds) > 1 else ""
        row = [f"{prefix}{method}, best on val"]
        for k in shots:
            scored = [(st[0], i) for i, g in enumerate(gs) if (st := _stats(_values(g, k, "val_acc")))]
            if not scored:
                row.append("-")
                continue
            best = max(scored, key=lambda t: (t[0], -t[1]))[1]
            row.append(_cell(_stats(_values(gs[best], k, metric)), with_n) + f" [{gs[best]['label']}]")
        rows.append(row)
    return rows


def build_report(records: list[dict], out_dir, plots: bool = True, skipped: str | None = None,
                 figures: dict | None = None) -> dict:
    """Write report.md (and accuracy_vs_shots.png when matplotlib is installed) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_build: dict = {}
    for r in records:
        by_build.setdefault(r.get("cache_build", "?"), []).append(r)
    stems = [recs[0].get("dataset", "?") for recs in by_build.values()]
    lines = ["# cachekit report", ""]
    lines += [f"- weights: {w}" for w in sorted({r.get("weights", "") for r in records})]
    sel = sorted({r.get("selection", "val") for r in records})
    lines += [f"- hyper-parameters chosen on: {', '.join(sel)}", f"- runs: {len(records)}"]
    if skipped:
        lines.append(f"- {skipped}")
    lines += ["", "Rows are (method, configuration): settings that differ from the method's defaults are shown "
              "next to its name. Cells: test accuracy (%), mean ± std over seeds (n = seeds). Rows "
              "'best on val' pick, at each shot count, the configuration with the best mean val accuracy.", ""]
    series: dict = {}
    for (build, recs) in by_build.items():
        ds = recs[0].get("dataset", "?")
        title = ds if stems.count(ds) == 1 else f"{ds} (cache build {build[:8]}, {recs[0].get('cache', '')})"
        header, rows = summarize(recs, with_n=True, best_on_val=True)
        lines += [f"## {title}", "", render_table(header, rows), ""]
        for g in _groups(recs).values():
            for k in sorted({kk for kk, _ in g["runs"]}):
                st = _stats(_values(g, k, "test_acc"))
                if st:
                    series.setdefault(title, {}).setdefault(g["label"], []).append((k, st[0], st[1]))
    png = _plot(series, out) if plots else None
    if plots and png is None:
        lines += ["(plots skipped: install the `report` extra, i.e. matplotlib)", ""]
    elif png is not None:
        lines += ["![accuracy vs shots](accuracy_vs_shots.png)", ""]
    if figures is not None:
        from .figures import figures_markdown

        lines += [figures_markdown(figures)]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"report": str(md), "plot": str(png) if png else None, "runs": len(records),
            "caches": len(by_build)}


def _plot(series: dict, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = max(len(series), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, (title, by) in zip(axes[0], series.items()):
        for lab, pts in by.items():
            pts.sort()
            ks, m, s = zip(*pts)
            ax.errorbar(ks, m, yerr=s, marker="o", capsize=3, label=lab[:40])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title[:50])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / "accuracy_vs_shots.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
