"""The `cachekit` command: a thin click layer over the cachekit library."""
from __future__ import annotations

import sys

import click

from cachekit import __version__

from .common import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachekit")
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
    cli(prog_name="cachekit")


if __name__ == "__main__":
    main()
