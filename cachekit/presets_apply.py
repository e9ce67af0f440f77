"""Turn a per-dataset preset into method overrides; the user's own settings win."""
from __future__ import annotations


def overrides_for(methods, preset: str | None, user: dict) -> dict:
    out: dict = {}
    if preset:
        from .methods.presets import get_preset

        p = get_preset(preset)
        s, n = list(p["s"]), list(p["n"])
        out["tip"] = {"s": s[:2], "n": n[:2]}
        out["ape"] = {"s": s, "n": n, "top_k": p["q_ape"], "weights": list(p["w"])}
        out["tipf"] = {"s": s[:2], "n": n[:2]}
        out["apet"] = {"s": s[:2], "n": n[:2], "top_k": p["q_ape_t"], "weights": list(p["w_ape_t"])}
    for m, params in (user or {}).items():
        out.setdefault(m, {}).update(params)
    return {m: v for m, v in out.items() if m in methods}
