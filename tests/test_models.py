"""Model loading: local checkpoints only (state dict and TorchScript archive), seeded random init."""
from __future__ import annotations

import warnings

import pytest
import torch

from cachekit.errors import CachekitError
from cachekit.models import available_models, load_model


def test_resnet_models_listed():
    names = available_models()
    for n in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "RN-tiny", "RN-tiny-224"):
        assert n in names


def test_random_init_is_seeded_and_labelled():
    a, b, c = (load_model("RN-tiny", None, init_seed=s) for s in (1, 1, 2))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.model.encode_image(x), b.model.encode_image(x))
        assert not torch.equal(a.model.encode_image(x), c.model.encode_image(x))
    assert a.random_weights and a.checkpoint_sha256 == "random" and "random weights" in a.weights_label


@pytest.mark.parametrize("kind", ["state_dict", "wrapped", "torchscript"])
def test_local_checkpoint_loads_exactly(tmp_path, kind):
    src = load_model("RN-tiny", None, init_seed=7).model
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / f"ckpt-{kind}.pt"
    if kind == "state_dict":
        torch.save(src.state_dict(), path)
    elif kind == "wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(src, (x, torch.zeros(2, 77, dtype=torch.long)), check_trace=False)
        traced.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = load_model("RN-tiny", str(path), init_seed=0)
    with torch.no_grad():
        assert torch.equal(got.model.encode_image(x), src.encode_image(x))
    assert not got.random_weights and len(got.checkpoint_sha256) == 64 and got.checkpoint == path.name


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CachekitError, match="not a file"):
        load_model("RN-tiny", str(tmp_path / "nope.pt"))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CachekitError, match="cannot read checkpoint"):
        load_model("RN-tiny", str(bad))
    other = tmp_path / "other.pt"
    torch.save(load_model("RN-tiny-224", None).model.state_dict(), other)
    with pytest.raises(CachekitError, match="does not fit model RN-tiny"):
        load_model("RN-tiny", str(other))
    with pytest.raises(CachekitError, match="unknown model"):
        load_model("ViT-B-32")
    # a tag name is never treated as something to download
    with pytest.raises(CachekitError, match="not a file"):
        load_model("RN50", "openai")
