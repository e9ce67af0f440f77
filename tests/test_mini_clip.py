"""The shipped mini-CLIP (docs/mini-clip.md): checksum, loading through the user-checkpoint path, and
zero-shot accuracy on the held-out demo images."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from cachekit.models import dense_and_pooled, load_model, sha256_file

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "cachekit" / "weights" / "mini-clip-openclipart.pt"
DEMO = REPO / "cachekit" / "demo_data" / "openclipart"
DOC = REPO / "docs" / "mini-clip.md"
MODEL = "mini-clip"
SHA256 = "d3028517bbe64ee02d4e93bab9a1f7732583ed7121b88b383d4bf4fb950bba02"
# Zero-shot ("a photo of a {}.") on all 320 held-out demo images, 10 classes: measured 45.3 %
# (chance 10 %; binomial standard error about 2.8 points at 320 images). The bound is the issue's
# target, 3x chance, 15 points (5 standard errors) below the measurement.
MIN_ZEROSHOT = 30.0


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bundle():
    return load_model(MODEL, pretrained=CHECKPOINT)


def test_checkpoint_sha256_is_the_documented_one():
    assert sha256_file(CHECKPOINT) == SHA256
    assert SHA256 in DOC.read_text(encoding="utf-8")
    assert CHECKPOINT.stat().st_size <= 8_000_000


def test_loads_like_a_user_checkpoint(bundle):
    # the ordinary --pretrained path: strict load, provenance recorded, not labelled random
    assert not bundle.random_weights
    assert bundle.checkpoint == CHECKPOINT.name and bundle.checkpoint_sha256 == SHA256
    assert "pretrained checkpoint" in bundle.weights_label
    sd = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    own = bundle.model.state_dict()
    assert set(sd) == set(own)
    assert all(torch.equal(own[k].to(v.dtype), v) for k, v in sd.items())
    # ResNet tower with attention pooling over a dense map of at least 3x3
    x = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    with torch.no_grad():
        dense, pooled = dense_and_pooled(bundle.visual, x)
        assert dense.shape[-2] >= 3 and dense.shape[-1] >= 3
        torch.testing.assert_close(pooled, bundle.model.encode_image(x))


def test_zeroshot_on_heldout_demo_images_is_well_above_chance(bundle):
    from PIL import Image

    from cachekit.augment import plain_transform
    from cachekit.models import encode_templates, text_classifier

    classes = sorted(p.name for p in DEMO.iterdir() if p.is_dir())
    files = [(f, y) for y, c in enumerate(classes) for f in sorted((DEMO / c).iterdir())]
    pc = bundle.preprocess_cfg
    tf = plain_transform(bundle.image_size, pc["mean"], pc["std"], pc["interpolation"])
    with torch.inference_mode():
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f, _ in files])
        feats = torch.nn.functional.normalize(bundle.model.encode_image(x).float(), dim=-1)
    emb, _ = encode_templates(bundle, [c.replace("_", " ") for c in classes], ["a photo of a {}."])
    pred = (feats @ text_classifier(emb).t()).argmax(1)
    acc = 100.0 * float((pred == torch.tensor([y for _, y in files])).float().mean())
    assert len(classes) == 10 and len(files) == 320
    assert acc >= MIN_ZEROSHOT, f"zero-shot {acc:.1f} % on the held-out demo images"


def test_heldout_images_are_excluded_from_pretraining():
    """Every demo image's source is excluded by the training script, also under another path
    (a byte-identical copy) and as a numbered / recoloured variant of the same drawing."""
    train = _tool("train_mini_clip")
    bdd = _tool("build_demo_data")
    rows = bdd.read_sources(DEMO / "SOURCES.tsv")
    assert len(rows) == 320 and len({r["sha256"] for r in rows}) == 320
    root = Path("/usr/share/openclipart/png")
    held = {"paths": {Path(r["source"]).relative_to(root).as_posix() for r in rows},
            "sha256": {r["sha256"] for r in rows},
            "families": {bdd.family_key(Path(r["source"]).stem) for r in rows}}
    far = torch.zeros(1, 2, 256).numpy()  # thumbnails never match: only path, content and family count here
    thumb = torch.zeros(2, 256).numpy()
    for r in rows:
        rel = Path(r["source"]).relative_to(root)
        copy = {"paths": [f"unsorted/duplicates/{rel.name}"], "sha256": r["sha256"]}
        variant = {"paths": [str(rel.parent / f"{rel.stem}_bw_02.png")], "sha256": "0" * 64}
        same = {"paths": [rel.as_posix()], "sha256": "1" * 64}
        assert train.exclusion_reason(same, thumb, held, far) == "path"
        assert train.exclusion_reason(copy, thumb, held, far) in ("sha256", "family")
        assert train.exclusion_reason(variant, thumb, held, far) == "family"


def test_training_captions_name_every_demo_class():
    """The class words are the category words of the captions of the classes' source folders."""
    train = _tool("train_mini_clip")
    bdd = _tool("build_demo_data")
    for name, spec in bdd.CLASS_SPECS.items():
        word = name.replace("_", " ")
        for folder in spec.folders:
            caps = train.caption_options([f"{folder}/some_title_01.png"])
            if folder == "transportation":  # the mixed root folder (vehicles and road signs) has no class word
                continue
            assert f"a photo of a {word}." in caps, (folder, caps)
    assert re.fullmatch(r"[0-9a-f]{64}", SHA256)
