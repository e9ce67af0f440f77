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


#: Most templates one set may hold (each is encoded once per class).
MAX_TEMPLATES = 10_000


def resolve_templates(spec: str | None) -> tuple[str, list[str]]:
    """`spec` is a set name or a text file with one template per line; returns (label, templates).

    A file is read at the edge (cachekit.data.read_text_file: UTF-8, a regular file, readable); every
    template must hold exactly one `{}` and format with a class name (no other `{...}` field)."""
    from .data import _display, _text_problem, read_text_file

    if spec is None:
        spec = "photo"
    key = spec.lower().replace("-", "").replace("_", "")
    if key in TEMPLATE_SETS:
        return key, list(TEMPLATE_SETS[key])
    fix = (f"use one of {', '.join(TEMPLATE_SETS)} or a text file with one template per line containing {{}}")
    if _text_problem(spec):
        raise CachekitError(f"--templates {_display(spec)!r} {_text_problem(spec)}; fix: {fix}")
    path = Path(spec)
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise CachekitError(f"unknown template set {spec!r}; fix: {fix}")
    text = read_text_file(path, "template file", "pass a UTF-8 text file with one template per line, each with one {}")
    lines = [ln.strip() for ln in text.split("\n")]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if not _formats(t)]
    if not templates or bad:
        what = f"line {bad[0][:80]!r} needs exactly one {{}} and no other {{...}} field" if bad else "it holds no template"
        raise CachekitError(f"template file {path}: {what}; fix: one template per line, each with one {{}} "
                            "(write a literal brace as {{ or }})")
    if len(templates) > MAX_TEMPLATES:
        raise CachekitError(f"template file {path} holds {len(templates):,} templates, over the limit of "
                            f"{MAX_TEMPLATES:,} (cachekit.templates.MAX_TEMPLATES); fix: keep the templates you need")
    for t in templates:
        if _text_problem(t):
            raise CachekitError(f"template {t[:80]!r} in {path} {_text_problem(t)}; fix: remove that character")
    return str(path), templates


_PROBE = "\x00cachekit-class\x00"


def _formats(template: str) -> bool:
    """True when `template.format(name)` works and puts the name in exactly once."""
    try:
        out = template.format(_PROBE)
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        return False
    return out.count(_PROBE) == 1
