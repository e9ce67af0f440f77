"""Shared fixtures: small real-looking image trees and a tiny-model cache built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from cachekit.synthetic import make_tree  # noqa: E402,F401  (tests import it from here)


def extract_opts(data, out, **kw):
    from cachekit.extraction import ExtractOptions

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
    from cachekit.extraction import extract

    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    extract(extract_opts(tree, out))
    return out
