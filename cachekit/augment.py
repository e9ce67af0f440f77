"""View transforms: CLIP's plain val preprocessing and the seeded APE/Tip-Adapter augmentation.

All randomness of :class:`AugmentedView` comes from a private ``torch.Generator`` seeded by
:func:`view_seed` ``(seed, image_key, view)``; the global torch / random / numpy RNGs are never used,
so a view is the same whatever process, worker, shard or order produces it.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PlainTransform",
    "plain_transform",
    "AugmentedView",
    "view_seed",
    "crop_params",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
}


def _interp(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {name!r}") from None


def _size_pair(image_size) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        if len(image_size) == 1:
            return int(image_size[0]), int(image_size[0])
        h, w = image_size[-2:]
        return int(h), int(w)
    return int(image_size), int(image_size)


def _to_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img.float() / 255.0 if img.dtype == torch.uint8 else img
    return F.to_tensor(img)


def _rgb(img):
    return img.convert("RGB") if isinstance(img, Image.Image) and img.mode != "RGB" else img


# --------------------------------------------------------------------------------------------- #
# plain (val/test) preprocessing
# --------------------------------------------------------------------------------------------- #
class PlainTransform:
    """Resize the shorter side to ``image_size`` (antialiased), centre crop, to tensor, normalise.

    Same operations, in the same order, as ``open_clip.image_transform(size, is_train=False)`` with the
    default ``resize_mode="shortest"``, so the output is identical.
    """

    def __init__(self, image_size, mean, std, interpolation: str = "bicubic"):
        self.size = _size_pair(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self._mode = _interp(interpolation)

    def __call__(self, img) -> torch.Tensor:
        th, tw = self.size
        if th == tw:
            img = F.resize(img, th, interpolation=self._mode, antialias=True)
        else:  # keep the ratio: the shorter side (relative to the target) matches the target
            h, w = F.get_dimensions(img)[1:]
            ratio = min(h / th, w / tw)
            img = F.resize(img, [round(h / ratio), round(w / ratio)], interpolation=self._mode, antialias=True)
        img = F.center_crop(img, [th, tw])
        x = _to_tensor(_rgb(img))
        return F.normalize(x, self.mean, self.std)

    def params(self) -> dict:
        return {
            "kind": "plain",
            "ops": "resize shorter side, center crop, to tensor, normalize",
            "image_size": list(self.size),
            "interpolation": self.interpolation,
            "antialias": True,
            "mean": list(self.mean),
            "std": list(self.std),
            "torchvision": torchvision.__version__,
        }

    def __repr__(self) -> str:
        return f"PlainTransform(size={self.size}, interpolation={self.interpolation!r})"


def plain_transform(image_size, mean, std, interpolation: str = "bicubic") -> PlainTransform:
    """CLIP val preprocessing (equal to open_clip's ``image_transform(image_size, is_train=False)``)."""
    return PlainTransform(image_size, mean, std, interpolation)


# --------------------------------------------------------------------------------------------- #
# seeded augmentation
# --------------------------------------------------------------------------------------------- #
def view_seed(seed: int, image_key: str, view: int) -> int:
    """63-bit seed for one (seed, image, view): first 8 bytes of sha256 over ``"{seed}\\0{image_key}\\0{view}"``.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    text = f"cachekit-view\x00{int(seed)}\x00{image_key}\x00{int(view)}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def crop_params(height: int, width: int, scale, ratio, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's ``RandomResizedCrop.get_params``
    algorithm (10 attempts, then a centre crop clamped to ``ratio``), drawing from ``generator`` only."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedView:
    """RandomResizedCrop(image_size, scale, ratio, bicubic, antialias) + horizontal flip(p) + normalise.

    ``view(img, seed, image_key, view)`` is a pure function of its arguments: a fresh
    ``torch.Generator`` seeded with :func:`view_seed` draws the crop (as torchvision) and then one
    ``torch.rand(1)`` for the flip (flip when ``< flip``), in the order torchvision's
    ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` would.
    """

    def __init__(self, image_size, mean, std, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5,
                 interpolation: str = "bicubic"):
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip}")
        self.size = _size_pair(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = float(flip)
        self.interpolation = interpolation
        self._mode = _interp(interpolation)

    def generator(self, seed: int, image_key: str, view: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(view_seed(seed, image_key, view))
        return g

    def __call__(self, img, seed: int, image_key: str, view: int) -> torch.Tensor:
        g = self.generator(seed, image_key, view)
        height, width = F.get_dimensions(img)[1:]
        i, j, h, w = crop_params(height, width, self.scale, self.ratio, g)
        out = F.resized_crop(img, i, j, h, w, list(self.size), interpolation=self._mode, antialias=True)
        if torch.rand(1, generator=g).item() < self.flip:
            out = F.hflip(out)
        x = _to_tensor(_rgb(out))
        return F.normalize(x, self.mean, self.std)

    def params(self) -> dict:
        return {
            "kind": "random_resized_crop+hflip",
            "image_size": list(self.size),
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": self.flip,
            "interpolation": self.interpolation,
            "antialias": True,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_attempts": 10,
            "seeding": "torch.Generator(cpu).manual_seed(view_seed(seed, image_key, view)); view_seed = "
                       "int.from_bytes(sha256('cachekit-view\\0{seed}\\0{image_key}\\0{view}')[:8], 'big') & (2**63-1); "
                       "draws: crop (torchvision get_params order), then rand(1) < flip",
            "torchvision": torchvision.__version__,
        }

    def __repr__(self) -> str:
        return (f"AugmentedView(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip}, interpolation={self.interpolation!r})")
