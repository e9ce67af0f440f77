"""Small synthetic image trees for tests, the reliability harness and examples (no data needed)."""
from __future__ import annotations

from pathlib import Path

#: One colour per class (cycled): each image carries its class colour as a blob on noise.
COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)]


def make_tree(root: Path, classes=3, per_class=8, size=(40, 32), seed=0, ext="png") -> Path:
    """ImageFolder tree root/class_C/img_II.EXT: a class colour blob on noise, so classes are separable."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            y0, x0 = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
            arr[y0:y0 + size[1] // 2, x0:x0 + size[0] // 2] = COLORS[c % len(COLORS)]
            Image.fromarray(arr).save(d / f"img_{i:02d}.{ext}")
    return Path(root)
