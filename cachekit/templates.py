"""Prompt template sets, by name, and reading them from a file."""
from __future__ import annotations

from pathlib import Path

from .errors import CachekitError

IMAGENET7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# The templates Tip-Adapter and APE use per benchmark dataset (see docs/cache-format.md).
TEMPLATE_SETS: dict[str, list[str]] = {
    "photo": ["a photo of a {}."],
    "imagenet": IMAGENET7,
    "caltech101": ["a photo of a {}."],
    "stanfordcars": ["a photo of a {}."],
    "sun397": ["a photo of a {}."],
    "oxfordpets": ["a photo of a {}, a type of pet."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "fgvcaircraft": ["a photo of a {}, a type of aircraft."],
    "food101": ["a photo of {}, a type of food."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
}


def resolve_templates(spec: str | None) -> tuple[str, list[str]]:
    """`spec` is a set name or a text file with one template per line; returns (label, templates)."""
    if spec is None:
        spec = "photo"
    key = spec.lower().replace("-", "").replace("_", "")
    if key in TEMPLATE_SETS:
        return key, list(TEMPLATE_SETS[key])
    path = Path(spec)
    if not path.is_file():
        raise CachekitError(f"unknown template set {spec!r}; fix: use one of {', '.join(TEMPLATE_SETS)} "
                            "or a text file with one template per line containing {}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        what = f"line {bad[0]!r} needs exactly one {{}}" if bad else "it holds no template"
        raise CachekitError(f"template file {path}: {what}; fix: one template per line, each with one {{}}")
    return str(path), templates
