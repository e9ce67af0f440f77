"""Shared fixtures: small real-looking image trees and a tiny-model cache built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)]


def make_tree(root: Path, classes=3, per_class=8, size=(40, 32), seed=0, ext="png") -> Path:
    """Class folders of small images: a class colour blob on noise, so classes are separable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            y0, x0 = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            arr[y0:y0 + size[1] // 2, x0:x0 + size[0] // 2] = COLORS[c % len(COLORS)]
            Image.fromarray(arr).save(d / f"img_{i:02d}.{ext}")
    return root


def extract_opts(data, out, **kw):
    from cachekit.extract import ExtractOptions

    base = dict(data=str(data), out=str(out), model="RN-tiny", shots=(1, 2), seeds=(1, 2), views=2,
                batch_size=4, dense_dtype="float32")
    base.update(kw)
    return ExtractOptions(**base)


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "data")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tree) -> Path:
    """A float32 RN-tiny cache of `tree`: 3 classes, shots 1,2, seeds 1,2, 2 augmented views."""
    from cachekit.extract import extract

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    extract(extract_opts(tree, out))
    return out
