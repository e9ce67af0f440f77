"""Shared CLI plumbing: one-line errors, JSON on stdout, progress on stderr."""
from __future__ import annotations

import functools
import json
import sys

import click

from cachekit.errors import CachekitError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "auto_envvar_prefix": "CACHEKIT"}


def int_list(ctx, param, value):
    """Parse '1,2,4' (or a repeated option) into a tuple of ints."""
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for p in parts:
        for tok in str(p).replace(" ", "").split(","):
            if not tok:
                continue
            try:
                out.append(int(tok))
            except ValueError:
                raise click.BadParameter(f"{tok!r} is not an integer (expected e.g. 1,2,4)") from None
    return tuple(out) if out else None


def float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(t) for t in str(value).replace(" ", "").split(",") if t)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


def friendly(fn):
    """Turn library errors into `Error: ...` (exit 1) and Ctrl-C into a resume hint (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CachekitError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: finished work is kept; rerun the same command to resume.", err=True)
            sys.exit(130)

    return wrapper


def emit_json(obj):
    click.echo(json.dumps(obj, indent=1, sort_keys=False, default=str))


def note(msg: str):
    """Human-facing lines go to stderr so `--json | jq` stays clean."""
    click.echo(msg, err=True)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
