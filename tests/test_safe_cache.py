"""SAFE on the cache: streaming equals in-memory, memory stays bounded, frozen path equals zero-shot."""
from __future__ import annotations

import tracemalloc

import numpy as np
import torch

from cachekit.cache import open_cache
from cachekit.methods import zeroshot
from cachekit.methods.safe import SafeConfig, SafeEstimator
from cachekit.task import CacheTask

CFG = dict(epochs=2, warmup_epochs=0, batch_size=4, seed=3)


def fit_safe(c, k, seed, out, max_memory=4 << 30):
    """SAFE on the cache as the runner does it (no stored fit reused), returning the fitted estimator."""
    task = CacheTask(c, k, seed, store=None, max_memory=max_memory, reuse_fits=False, fit_out=out)
    est = SafeEstimator(SafeConfig.from_dict(CFG)).fit(task)
    est.select(task)
    return est


def _fit_peak(c, tmp, **kw):
    tracemalloc.start()
    res = fit_safe(c, 8, 1, str(tmp / f"fit{len(kw)}.h5"), **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return res, peak


def test_streaming_equals_in_memory_with_bounded_memory(tmp_path, tree, monkeypatch):
    """With --max-memory below the split's size the dense maps stream from HDF5: the same fit, no read
    of more than one batch of maps at once, and a traced peak (numpy buffers of the maps are traced)
    lower than the in-memory fit's by most of the split's size."""
    from cachekit.cache import DenseSource

    reads = []
    get = DenseSource.get
    monkeypatch.setattr(DenseSource, "get", lambda self, idx: (reads.append(len(np.atleast_1d(idx))), get(self, idx))[1])
    monkeypatch.setattr(DenseSource, "load_stored", lambda self: (_ for _ in ()).throw(AssertionError("loaded whole")))
    from cachekit.extraction import extract
    from conftest import extract_opts

    path = tmp_path / "many_views.h5"
    extract(extract_opts(tree, path, shots=(8,), seeds=(1,), views=40, batch_size=64))
    with open_cache(path) as c:
        src, _ = CacheTask(c, 8, 1, max_memory=0).train_dense()
        assert type(src).__name__ == "DenseSource"
        full = src.nbytes  # 24 rows x 40 views x 512x2x2 float32 = 7.9 MB; SAFE reads <= 256 maps at once
        fit_safe(c, 8, 1, str(tmp_path / "warm.h5"), max_memory=0)
        stream, peak_stream = _fit_peak(c, tmp_path, max_memory=0)
        assert 0 < max(reads) <= 256 < len(src)
        monkeypatch.undo()
        mem, peak_mem = _fit_peak(c, tmp_path)
    for name, t in mem.params.items():
        assert torch.equal(t, stream.params[name]), name
    assert peak_mem > full
    assert peak_mem - peak_stream > full / 3, (peak_mem, peak_stream, full)


def test_float16_maps_stay_float16_in_memory_and_fit_as_if_streamed(tmp_path, tree):
    """A float16 cache's maps are held in memory as float16 (half of float32), and SAFE's fit on them equals the
    streamed fit bit for bit: widening per batch is exact."""
    from cachekit.extraction import extract
    from cachekit.methods.safe import SafeConfig, TensorSource, fit
    from conftest import extract_opts

    path = tmp_path / "half.h5"
    extract(extract_opts(tree, path, shots=(2,), seeds=(1,), views=2, dense_dtype="float16"))
    with open_cache(path) as c:
        W = c.text_classifier()
        params, heads = c.attnpool_params()
        mem_src, labels = CacheTask(c, 2, 1).train_dense()
        stream_src, _ = CacheTask(c, 2, 1, max_memory=0).train_dense()
        assert isinstance(mem_src, TensorSource) and mem_src.tensor.dtype == torch.float16
        assert type(stream_src).__name__ == "DenseSource" and stream_src.stored_nbytes * 2 == stream_src.nbytes
        assert torch.equal(mem_src.get(np.arange(len(mem_src))), stream_src.get(np.arange(len(stream_src))))
        cfg = SafeConfig(epochs=2, batch_size=4)
        a = fit(mem_src, labels, W, params, heads, cfg)
        b = fit(stream_src, labels, W, params, heads, cfg)
    for name, t in a.params.items():
        assert torch.equal(t, b.params[name]), name


def test_frozen_blend_is_zero_shot(tiny_cache):
    with open_cache(tiny_cache) as c:
        res = fit_safe(c, 1, 2, str(tiny_cache.parent / "z.h5"))
        zs = zeroshot.select(c.features("val"), c.labels("val"), c.text_classifier(),
                             c.features("test"), c.labels("test"))
    sel = res.selection
    assert sel.extra["val_acc_frozen"] == zs.val_acc
    assert sel.extra["test_acc_frozen"] == zs.test_acc
    assert sel.val_acc >= sel.extra["val_acc_frozen"]
    assert [e["epoch"] for e in res.log] == [1, 2] and np.isfinite(res.log[-1]["loss"])
