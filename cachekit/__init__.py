"""cachekit: run CLIP once into an HDF5 feature cache, then adapt it few-shot many ways."""

__version__ = "0.1.0"
