"""Turn a per-dataset preset into method overrides; the user's own settings win."""
from __future__ import annotations


def overrides_for(methods, preset: str | None, user: dict) -> dict:
    out: dict = {}
    if preset:
        from .methods.presets import get_preset

        p = get_preset(preset)
        s = list(p["s"])
        out["tip"] = {"s": s[:2]}
        out["ape"] = {"s": s, "top_k": p["q_ape"], "weights": list(p["weights"])}
        if p.get("n_gamma"):
            out["ape"]["n"] = [200, 20, p["n_gamma"]]
    for m, params in (user or {}).items():
        out.setdefault(m, {}).update(params)
    return {m: v for m, v in out.items() if m in methods}
