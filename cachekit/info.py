"""`cachekit info`: what is inside a cache (names of fields from cachekit.schema)."""
from __future__ import annotations

import os

from . import schema as S
from .cache import Cache
from .schema import Attr

PROVENANCE = (Attr.SCHEMA_VERSION, Attr.CACHEKIT_VERSION, Attr.OPEN_CLIP_VERSION, Attr.TORCH_VERSION,
              Attr.H5PY_VERSION, Attr.CREATED, Attr.IMAGE_SIZE, Attr.PREPROCESS, Attr.AUGMENT, Attr.DENSE_DTYPE,
              Attr.DATASET_FORMAT, Attr.DATASET_FINGERPRINT, Attr.INIT_SEED)


def describe(cache: Cache) -> dict:
    splits = {}
    for s in S.SPLITS:
        dense, pooled = cache._dense_ds(s), cache._split_ds(s, S.POOLED, verify=False)
        splits[s] = {
            "images": cache.num_images(s),
            "views": int(dense.shape[0]) if s == "train" else 1,
            "dense": {"shape": list(dense.shape), "dtype": str(dense.dtype),
                      "bytes": int(dense.id.get_storage_size())},
            "pooled": {"shape": list(pooled.shape), "dtype": str(pooled.dtype)},
        }
    if cache.val_is_test:
        splits["test"]["same_as"] = "val"
    m = cache._meta  # a missing attribute is a one-line CachekitError
    return {
        "path": str(cache.path),
        "file_bytes": os.path.getsize(cache.path),
        "weights": cache.weights_label,
        "random_weights": cache.random_weights,
        "model": m(Attr.MODEL),
        "checkpoint": m(Attr.CHECKPOINT),
        "checkpoint_sha256": m(Attr.CHECKPOINT_SHA256),
        "classes": cache.num_classes,
        "embed_dim": cache.embed_dim,
        "dense_shape": list(cache.dense_shape),
        "views": cache.views,
        "shots": cache.shots,
        "seeds": cache.seeds,
        "fewshot_sets": [S.fewshot_key(k, s) for k, s in cache.fewshot_names()],
        "splits": splits,
        "val_is_test": cache.val_is_test,
        "templates": cache.templates(),
        "bad_images": len(cache.bad_images()),
        "provenance": {k: m(k) for k in PROVENANCE},
    }
