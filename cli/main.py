"""The `cachekit` command: a thin click layer over the cachekit library."""
from __future__ import annotations

import os
import sys

import click

from cachekit import __version__

from .common import CONTEXT, guarded


class GuardedGroup(click.Group):
    """The top-level guard: whatever a sub-command raises while its options are parsed (callbacks) or while
    it runs becomes one `Error: ...` line (see cli.common.guarded); `--debug` shows the traceback."""

    def invoke(self, ctx):
        return guarded(lambda: super(GuardedGroup, self).invoke(ctx))


def _set_debug(ctx, param, value):
    if value:
        ctx.meta["cachekit.debug"] = True
    return value


@click.group(cls=GuardedGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachekit")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
              help="On an unexpected error, print the Python traceback (also: CACHEKIT_DEBUG=1).")
def cli():
    """Run CLIP once into an HDF5 feature cache, then adapt it few-shot many ways.

    Typical flow: extract -> info/verify -> refine -> eval / sweep -> report.
    """


def _register():
    from . import bench_cmds, cache_cmds, method_cmds, pipeline_cmds

    for mod in (cache_cmds, method_cmds, pipeline_cmds, bench_cmds):
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


_register()


def _quiet_h5py_dealloc(unraisable, _default=sys.unraisablehook):
    # After a failed HDF5 write (disk full) h5py's handle finalisers print 'Exception ignored'
    # tracebacks; the command has already said what went wrong in one line.
    if isinstance(unraisable.exc_value, OSError) and "ObjectID" in repr(getattr(unraisable, "object", "")):
        return
    _default(unraisable)


def main():
    sys.unraisablehook = _quiet_h5py_dealloc
    try:
        cli(prog_name="cachekit")
    except BrokenPipeError:
        # the reader of stdout went away (`cachekit info --json | head -1`): nothing left to say to it
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(141)


if __name__ == "__main__":
    main()
