"""Per-dataset presets of the training-free methods (docs/methods-training-free.md).

Each preset is a plain dict:
  templates     prompt templates of the text classifier (the anchors' per-dataset choice)
  template_set  the matching name in cachekit.templates.TEMPLATE_SETS
  s             search scales (s_beta, s_alpha, s_gamma) of Tip-Adapter (first two) and APE
  n             search steps (n_beta, n_alpha, n_gamma); ImageNet uses n_gamma = 5
  q_ape         channels kept by APE's refinement (RN50, D = 1024)
  q_ape_t       channels kept by APE-T's refinement
  w             (w0, w1) of APE's criterion J = -w0 sim + w1 var
  w_ape_t       (w0, w1) of APE-T's criterion (text-only similarity)
  safe          SAFE settings of RAFT's per-dataset scripts (batch 128 and consistency weight 1.0 on ImageNet)
"default" is for datasets outside the benchmark: the Caltech101-style settings with the median Q.
"""
from __future__ import annotations

import copy

from ..errors import CachekitError
from ..templates import TEMPLATE_SETS

def _preset(template_set, s, q_ape, q_ape_t, w, n_gamma=20, safe=None):
    return {"templates": list(TEMPLATE_SETS[template_set]), "template_set": template_set, "s": tuple(s),
            "n": (200, 20, n_gamma), "q_ape": q_ape, "q_ape_t": q_ape_t, "w": tuple(w), "w_ape_t": (0.2, 0.8),
            "safe": dict(safe or {})}


#: RAFT's ImageNet (and SUN397) scripts: batch 128; ImageNet also weighs the consistency loss 1.0.
_SAFE_IMAGENET = {"batch_size": 128, "consistency_weight": 1.0}


PRESETS: dict[str, dict] = {
    "imagenet": _preset("imagenet", (7, 7, 0.5), 500, 500, (0.7, 0.3), n_gamma=5, safe=_SAFE_IMAGENET),
    "caltech101": _preset("caltech101", (7, 7, 1), 800, 900, (0.5, 0.5)),
    "dtd": _preset("dtd", (7, 7, 1), 400, 700, (0.5, 0.5)),
    "eurosat": _preset("eurosat", (30, 5, 1.5), 700, 900, (0.9, 0.1)),
    "fgvcaircraft": _preset("fgvcaircraft", (20, 10, 1), 800, 900,
                            (0.1, 0.9)),
    "food101": _preset("food101", (7, 7, 1), 700, 900, (0.3, 0.7)),
    "flowers102": _preset("flowers102", (7, 7, 1), 700, 800,
                          (0.4, 0.6)),
    "oxfordpets": _preset("oxfordpets", (7, 7, 1), 800, 800, (0.7, 0.3)),
    "stanfordcars": _preset("stanfordcars", (10, 7, 1), 500, 800, (0.6, 0.4)),
    "sun397": _preset("sun397", (10, 7, 1), 800, 800, (0.7, 0.3), safe={"batch_size": 128}),
    "ucf101": _preset("ucf101", (10, 7, 1.5), 700, 800, (0.3, 0.7)),
    "default": _preset("photo", (7, 7, 1), 700, 800, (0.5, 0.5)),
}

#: Other spellings (CoOp directory and class names), compared after lower-casing and dropping - _ and spaces.
ALIASES = {
    "oxfordflowers": "flowers102",
    "flowers": "flowers102",
    "pets": "oxfordpets",
    "cars": "stanfordcars",
    "aircraft": "fgvcaircraft",
    "describabletextures": "dtd",
    "sun": "sun397",
}


def _key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch not in "-_ ")


def get_preset(name: str) -> dict:
    """A deep copy of the preset for `name` (case, '-', '_' and spaces ignored; CoOp names accepted)."""
    key = _key(name)
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise CachekitError(f"unknown dataset preset {name!r}; fix: use one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def merge(preset: dict, overrides: dict | None) -> dict:
    """preset updated with every override whose value is not None (user settings win); a new dict."""
    out = copy.deepcopy(preset)
    for key, value in (overrides or {}).items():
        if value is not None:
            out[key] = copy.deepcopy(value)
    return out


def overrides_for(methods, preset: str | None, user: dict | None) -> dict:
    """Per-method settings: the preset's (if any), then the user's, which win. Only `methods` are kept;
    every value is checked later against the method's declarations (cachekit.params)."""
    out: dict = {}
    if preset:
        p = get_preset(preset)
        s, n = list(p["s"]), list(p["n"])
        out["tip"] = {"s": s[:2], "n": n[:2]}
        out["ape"] = {"s": s, "n": n, "top_k": p["q_ape"], "weights": list(p["w"])}
        out["tipf"] = {"s": s[:2], "n": n[:2]}
        out["apet"] = {"s": s[:2], "n": n[:2], "top_k": p["q_ape_t"], "weights": list(p["w_ape_t"])}
        if p["safe"]:
            out["safe"] = dict(p["safe"])
            out["safe-a"] = {"safe": dict(p["safe"])}
    for m, params in (user or {}).items():
        if m == "safe-a" and "safe" in out.get(m, {}) and isinstance(params.get("safe"), dict):
            params = {**params, "safe": {**out[m]["safe"], **params["safe"]}}
        out.setdefault(m, {}).update(params)
    return {m: v for m, v in out.items() if m in methods}
