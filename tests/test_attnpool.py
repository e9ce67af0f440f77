"""cachekit.attnpool against open_clip's own AttentionPool2d (float32, max relative error < 1e-5)."""
from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.modified_resnet import AttentionPool2d  # noqa: E402

from cachekit.attnpool import (  # noqa: E402
    GROUPS,
    PARAM_NAMES,
    AttnPool,
    attnpool_full,
    attnpool_single_query,
    tokens,
)
from cachekit.errors import CachekitError  # noqa: E402

TOL = 1e-5
TINY = "RN-tiny-attnpool-test"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def three_ways(x, params, num_heads):
    mod = AttnPool.from_params(params, num_heads)
    with torch.no_grad():
        return {
            "AttnPool": mod(x),
            "attnpool_full": attnpool_full(x, params, num_heads),
            "attnpool_single_query": attnpool_single_query(x, params, num_heads),
        }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model_cfg")
    path = d / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    model.eval()
    return model


def dense_of(model, x):
    v = model.visual
    return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))


def test_tiny_model_geometry(tiny_model):
    ap = tiny_model.visual.attnpool
    assert isinstance(ap, AttentionPool2d)
    assert ap.num_heads == 32  # width 16 * 32 // head_width 16
    assert tuple(ap.positional_embedding.shape) == (2 * 2 + 1, 512)
    assert tuple(ap.c_proj.weight.shape) == (64, 512)


def test_state_dict_keys_equal_open_clip(tiny_model):
    ap = tiny_model.visual.attnpool
    mod = AttnPool.from_params(ap.state_dict(), ap.num_heads)
    assert list(mod.state_dict().keys()) == list(ap.state_dict().keys())
    assert tuple(mod.state_dict().keys()) == PARAM_NAMES
    for k, v in ap.state_dict().items():
        assert torch.equal(mod.state_dict()[k], v)
    # params() gives detached clones with the same names and values
    p = mod.params()
    assert set(p) == set(PARAM_NAMES)
    for k in PARAM_NAMES:
        assert torch.equal(p[k], ap.state_dict()[k])
        assert not p[k].requires_grad
    p["c_proj.bias"].add_(1.0)
    assert torch.equal(mod.c_proj.bias.detach(), ap.c_proj.bias.detach())


def test_equals_open_clip_on_model_dense_map(tiny_model):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    ap = tiny_model.visual.attnpool
    with torch.no_grad():
        dense = dense_of(tiny_model, x)
        ref_layer = ap(dense)
        ref_image = tiny_model.encode_image(x)
    assert dense.shape == (4, 512, 2, 2)
    assert torch.equal(ref_layer, ref_image)
    assert float(ref_image.abs().max()) > 0
    for name, out in three_ways(dense, ap.state_dict(), ap.num_heads).items():
        assert out.shape == (4, 64)
        assert rel_err(out, ref_layer) < TOL, name
        assert rel_err(out, ref_image) < TOL, name


def test_equals_open_clip_on_synthetic_order_one_maps(tiny_model):
    # Random-init maps are small (bn3 zero-init); O(1) non-negative maps exercise the softmax properly.
    ap = tiny_model.visual.attnpool
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(6, 512, 2, 2, generator=g) * 3)
    with torch.no_grad():
        ref = ap(x)
    outs = three_ways(x, ap.state_dict(), ap.num_heads)
    for name, out in outs.items():
        assert rel_err(out, ref) < TOL, name
    # The maps are not degenerate: pooled features differ across samples.
    assert float((ref[0] - ref[1]).abs().max()) > 1e-2


def test_rn50_like_7x7_geometry():
    # RN50 geometry (7x7 map, head width 32) at a small channel count: C_in=256, 8 heads, D=128.
    torch.manual_seed(3)
    ap = AttentionPool2d(spacial_dim=7, embed_dim=256, num_heads=8, output_dim=128).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(5, 256, 7, 7, generator=g) * 3)
    with torch.no_grad():
        ref = ap(x)
    params = ap.state_dict()
    for name, out in three_ways(x, params, 8).items():
        assert out.shape == (5, 128)
        assert rel_err(out, ref) < TOL, name
    # numpy arrays are accepted too (as read from HDF5)
    np_params = {k: v.numpy() for k, v in params.items()}
    with torch.no_grad():
        out = AttnPool.from_params(np_params, 8)(x)
    assert rel_err(out, ref) < TOL


def test_tokens_layout():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 2, 2, generator=g)
    pos = torch.randn(5, 3, generator=g)
    t = tokens(x, pos)
    assert t.shape == (2, 5, 3)
    assert torch.allclose(t[:, 0], x.mean(dim=(2, 3)) + pos[0])
    # token 1 + (i*W + j) is spatial position (i, j), row-major like open_clip's flatten
    assert torch.allclose(t[:, 1 + 1 * 2 + 0], x[:, :, 1, 0] + pos[3])
    with pytest.raises(CachekitError, match="positional_embedding"):
        tokens(x, torch.zeros(4, 3))


def test_gradients_flow_and_groups():
    torch.manual_seed(6)
    ap = AttentionPool2d(spacial_dim=2, embed_dim=16, num_heads=4, output_dim=8)
    mod = AttnPool.from_params(ap.state_dict(), 4)
    x = torch.relu(torch.randn(3, 16, 2, 2))
    mod(x).sum().backward()
    for name, prm in mod.named_parameters():
        assert prm.grad is not None and float(prm.grad.abs().sum()) > 0, name
    assert [id(p) for p in mod.param_groups(["pos"])] == [id(mod.positional_embedding)]
    assert len(mod.param_groups(["qkv"])) == 6
    assert len(mod.param_groups(["c_proj", "pos"])) == 3
    assert len(mod.param_groups("c_proj")) == 2
    assert len(mod.param_groups(list(GROUPS))) == len(PARAM_NAMES)
    with pytest.raises(CachekitError, match="pos, qkv, c_proj"):
        mod.param_groups(["pos", "mlp"])


def test_bad_params_raise():
    torch.manual_seed(7)
    ap = AttentionPool2d(spacial_dim=2, embed_dim=16, num_heads=4, output_dim=8)
    p = ap.state_dict()
    with pytest.raises(CachekitError, match="num_heads"):
        AttnPool.from_params(p, 3)
    broken = {k: v for k, v in p.items() if k != "v_proj.bias"}
    with pytest.raises(CachekitError, match="v_proj.bias"):
        attnpool_single_query(torch.zeros(1, 16, 2, 2), broken, 4)
    with pytest.raises(CachekitError, match="does not fit"):
        attnpool_full(torch.zeros(1, 16, 3, 3), p, 4)
