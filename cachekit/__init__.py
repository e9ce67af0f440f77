"""cachekit: run CLIP once into an HDF5 feature cache, then adapt it few-shot many ways."""

__version__ = "0.1.0"


def open_cache(path):
    """Open a cache read-only (see cachekit.cache.Cache)."""
    from .cache import open_cache as _open

    return _open(path)


def extract(**options):
    """Python API of `cachekit extract`: keyword arguments as in cachekit.extraction.ExtractOptions."""
    from .extraction import ExtractOptions, extract as _extract

    return _extract(ExtractOptions(**options))
