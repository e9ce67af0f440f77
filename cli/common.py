"""Shared CLI plumbing: one-line errors, JSON on stdout, progress on stderr."""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback

import click

from cachekit.errors import CachekitError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "auto_envvar_prefix": "CACHEKIT"}


#: Largest magnitude of an integer option (shots, seeds): they are stored as int64 in caches and results.
INT_LIMIT = 2**63 - 1


def int_list(ctx, param, value):
    """Parse '1,2,4' (or a repeated option) into a tuple of ints; a value naming no number is an error."""
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else [value]
    if not parts:
        return None
    out = []
    for p in parts:
        for tok in str(p).replace(" ", "").split(","):
            if not tok:
                continue
            try:
                n = int(tok)
            except ValueError:
                raise click.BadParameter(f"{_show(tok)} is not an integer (expected e.g. 1,2,4)") from None
            if abs(n) > INT_LIMIT:
                raise click.BadParameter(f"{_show(tok)} is out of range (at most {INT_LIMIT} in magnitude)")
            out.append(n)
    if not out:
        raise click.BadParameter(f"{_show(','.join(map(str, parts)))} names no number (expected e.g. 1,2,4)")
    return tuple(out)


def _show(text, n: int = 60) -> str:
    """A user value, quoted and shortened, safe to print on one line."""
    r = repr(str(text))
    return r if len(r) <= n else r[: n - 4] + "...'"


def float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(t) for t in str(value).replace(" ", "").split(",") if t)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


DEBUG_ENV = "CACHEKIT_DEBUG"


def debug_enabled() -> bool:
    """`cachekit --debug ...` or CACHEKIT_DEBUG=1: show the traceback of an unexpected error."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get("cachekit.debug"))


def printable(text) -> str:
    """Text safe to print on any terminal: a name's bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    from cachekit.data import _display

    return _display(text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def unexpected_error(exc: BaseException) -> click.ClickException:
    """One line for an exception cachekit did not expect (a bug): `Error: internal error: <type>: <message>;
    fix: rerun with --debug ...`. With --debug the traceback is printed (stderr) first."""
    if debug_enabled():
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        click.echo(printable(text.rstrip("\n")), err=True)
    if isinstance(exc, MemoryError):
        return click.ClickException(
            f"out of memory{': ' + _first_line(exc) if _first_line(exc) else ''}; fix: ask for less (fewer "
            "images, shots, views or a smaller --batch-size) or use a machine with more memory; rerun with "
            "--debug for the traceback")
    what = type(exc).__name__
    msg = printable(_first_line(exc))
    return click.ClickException(f"internal error: {what}{': ' + msg if msg else ''}; fix: rerun with --debug "
                                "for the traceback and report it")


def interrupted():
    click.echo("Interrupted: finished work is kept; rerun the same command to resume.", err=True)
    sys.exit(130)


# click's own ways to end a command (usage errors, --help, exit codes): never rewritten.
_CLICK_EXITS = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit)


def guarded(call):
    """Run `call()`: library errors become `Error: ...` (exit 1), Ctrl-C a resume hint (exit 130), and any
    other exception one `Error: internal error ...` line (exit 1; the traceback with --debug)."""
    try:
        return call()
    except _CLICK_EXITS:
        raise
    except CachekitError as exc:
        raise click.ClickException(printable(str(exc).replace("\n", " "))) from None
    except KeyboardInterrupt:
        interrupted()
    except Exception as exc:  # noqa: BLE001 - the top-level guard: anything unexpected is one line
        raise unexpected_error(exc) from None


def friendly(fn):
    """Turn library errors into `Error: ...` (exit 1), Ctrl-C into a resume hint (exit 130) and anything
    unexpected into one `Error: internal error ...` line (see `guarded`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return guarded(lambda: fn(*args, **kwargs))

    return wrapper


def emit_json(obj):
    click.echo(json.dumps(obj, indent=1, sort_keys=False, default=str))


def note(msg: str):
    """Human-facing lines go to stderr so `--json | jq` stays clean."""
    click.echo(msg, err=True)


def table(rows: list[list], header: list[str]) -> str:
    from cachekit.report import render_table

    return render_table(header, rows)


def emit_json_lines(rows):
    """Row streams (eval, fit-safe) print one JSON object per line."""
    for r in rows:
        click.echo(json.dumps(r, default=str))


# Options with one meaning on every command that takes them.
def shots_option(fn):
    return click.option("--shots", default=None, callback=int_list,
                        help="Shot counts K, e.g. 1,2,4 (default: every K in the cache).")(fn)


def seeds_option(fn):
    return click.option("--seeds", default=None, callback=int_list,
                        help="Few-shot seeds, e.g. 1,2,3 (default: every seed in the cache).")(fn)


def quiet_option(fn):
    return click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")(fn)


def device_option(fn):
    return click.option("--device", default="cpu", help="Device for searches and training: cpu, cuda, cuda:N.")(fn)


def max_memory_option(fn):
    return click.option("--max-memory", default="4GiB", callback=lambda c, p, v: parse_bytes(v),
                        help="Hold dense maps (SAFE) in memory, in the cache's dtype, up to this size; else "
                             "stream them from the cache.")(fn)


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 1000,
             "mb": 10**6, "gb": 10**9, "tb": 10**12}
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("kmgtib")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 512MiB or 4GiB") from None
    if not (0 <= value < 2**63):
        raise click.BadParameter(f"{text!r} is not a size between 0 and 8 EiB, e.g. 4GiB")
    return int(value)


def progress_view(quiet: bool, as_json: bool = False):
    from .progress_view import ProgressView

    return ProgressView(quiet=quiet or as_json)


def parse_sets(values) -> dict:
    """--set METHOD.PARAM=VALUE (VALUE is JSON, or a plain string) -> {method: {param: value}}."""
    out: dict = {}
    for v in values or ():
        if "=" not in v or "." not in v.split("=", 1)[0]:
            raise click.BadParameter(f"{v!r} is not METHOD.PARAM=VALUE (e.g. ape.top_k=700)", param_hint="--set")
        key, val = v.split("=", 1)
        m, p = key.split(".", 1)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass
        out.setdefault(m.strip(), {})[p.strip()] = val
    return out
