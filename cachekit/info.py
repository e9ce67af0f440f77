"""`cachekit info`: what is inside a cache."""
from __future__ import annotations

import os

from .cache import SPLIT_NAMES, Cache


def describe(cache: Cache) -> dict:
    f = cache.file
    splits = {}
    for s in SPLIT_NAMES:
        g = f[f"splits/{s}"]
        splits[s] = {
            "images": int(g["labels"].shape[0]),
            "views": int(g["dense"].shape[0]) if s == "train" else 1,
            "dense": {"shape": list(g["dense"].shape), "dtype": str(g["dense"].dtype),
                      "bytes": int(g["dense"].id.get_storage_size())},
            "pooled": {"shape": list(g["pooled"].shape), "dtype": str(g["pooled"].dtype)},
        }
    if cache.val_is_test:
        splits["test"]["same_as"] = "val"
    m = cache.meta
    return {
        "path": str(cache.path),
        "file_bytes": os.path.getsize(cache.path),
        "weights": m["weights"],
        "random_weights": bool(m["random_weights"]),
        "model": m["model"],
        "checkpoint": m["checkpoint"],
        "checkpoint_sha256": m["checkpoint_sha256"],
        "classes": cache.num_classes,
        "embed_dim": cache.embed_dim,
        "dense_shape": list(cache.dense_shape),
        "views": cache.views,
        "shots": cache.shots,
        "seeds": cache.seeds,
        "fewshot_sets": [f"K{k}_seed{s}" for k, s in cache.fewshot_names()],
        "splits": splits,
        "val_is_test": cache.val_is_test,
        "templates": cache.templates(),
        "bad_images": len(cache.bad_images()),
        "provenance": {k: m[k] for k in ("schema_version", "cachekit_version", "open_clip_version",
                                         "torch_version", "h5py_version", "created", "image_size",
                                         "preprocess", "augment", "dense_dtype", "dataset_format",
                                         "dataset_fingerprint", "init_seed")},
    }
