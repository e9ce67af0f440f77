"""Dataset layer: dataset descriptions, few-shot sampling and robust image loading.

Three ways to describe a dataset (``cachekit extract DATA``), all turned into one :class:`DatasetSpec`:

* an ImageFolder tree (class folders directly under DATA, or ``train/ val/ test/`` sub-trees);
* a CoOp/Dassl split file (``split_zhou_<Name>.json``) plus ``image_root``;
* a manifest (``.csv`` or ``.jsonl``) with ``path,label,split``.

Every user-facing problem is a :class:`~cachekit.errors.CachekitError` whose message is one line:
``<problem naming the file/value>; fix: <what to do>``. See ``docs/data-formats.md`` for the rules.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import random
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BadImageError, CachekitError

__all__ = [
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "Item",
    "DatasetSpec",
    "FewShotSet",
    "load_dataset",
    "sample_fewshot",
    "load_image",
    "check_image",
    "read_classnames",
    "read_text_file",
    "available_memory",
    "MAX_FEWSHOT_ROWS",
]

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: Largest image (width x height) that :func:`load_image` decodes; larger ones are refused as
#: probable decompression bombs. Pillow's own limit (89 MP warning, 179 MP error) is raised to this
#: value on import so that legitimately large photos (e.g. 100-300 MP scans) load.
MAX_PIXELS = 400_000_000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# load_image refuses every image over MAX_PIXELS itself, with a one-line error; Pillow's warning
# (two lines on stderr) would only duplicate it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_SHOW = 5  # how many offending paths an error message names

#: Most rows (classes x K) one few-shot set may hold: a larger request is refused before sampling.
MAX_FEWSHOT_ROWS = 10_000_000


# --------------------------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------------------------- #
def _one_line(value) -> str:
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


def _display(value) -> str:
    """A path or name as printable text: bytes of a name that are not UTF-8 are shown as \\xNN."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    s = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(problem: str, fix: str) -> CachekitError:
    return CachekitError(_display(f"{_one_line(problem)}; fix: {_one_line(fix)}"))


def _text_problem(text: str) -> str | None:
    """Why a name or path cannot be stored in a cache (HDF5 strings are UTF-8 without NUL), else None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _file_problem(path) -> tuple[str | None, os.stat_result | None]:
    """(None, stat) for a readable regular file; else (the one-line reason, None): missing, broken link,
    permission denied, a folder, a FIFO or other special file."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return ("missing (broken link)" if os.path.islink(p) else "missing"), None
    except NotADirectoryError:
        return "missing (a parent in its path is a file)", None
    except PermissionError:
        return "permission denied", None
    except (OSError, ValueError) as exc:
        return (getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"), None
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file", None
    if not stat.S_ISREG(st.st_mode):
        return f"{_file_kind(st.st_mode)}, not a regular file", None
    if not os.access(p, os.R_OK):
        return "permission denied", None
    return None, st


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; the physical memory if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def read_text_file(path, what: str, fix: str) -> str:
    """The text of a small user file (manifest, split file, class names, templates), read at the edge: a
    missing file, a folder, a FIFO or device (reading it would block), no permission, more than the memory
    available, or bytes that are not UTF-8 are each one CachekitError naming the file and the fix."""
    p = Path(path)
    shown = _display(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _error(f"{what} {shown} does not exist", fix) from None
    except PermissionError:
        raise _error(f"cannot read {what} {shown}: permission denied",
                     "make it readable (e.g. chmod a+r) or pass another file") from None
    except (OSError, ValueError) as exc:
        raise _error(f"cannot read {what} {shown} ({getattr(exc, 'strerror', None) or exc})", fix) from None
    if not stat.S_ISREG(st.st_mode):
        raise _error(f"{what} {shown} is {_file_kind(st.st_mode)}, not a regular file", fix)
    # parsing keeps the text and its rows in memory: about 20 bytes per byte of file in Python objects
    limit = available_memory() // 20
    if st.st_size > limit:
        raise _error(f"{what} {shown} is {_gib(st.st_size)}; reading it needs about {_gib(st.st_size * 20)} of "
                     f"memory, {_gib(available_memory())} are available (limit {_gib(limit)} of file)",
                     "split it into smaller files or use a machine with more memory")
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except PermissionError:
        raise _error(f"cannot read {what} {shown}: permission denied",
                     "make it readable (e.g. chmod a+r) or pass another file") from None
    except OSError as exc:
        raise _error(f"cannot read {what} {shown} ({exc.strerror or type(exc).__name__})", fix) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _error(f"{what} {shown} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                     "save it as UTF-8") from None


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _first_few(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOW])
    return shown + (", ..." if len(paths) > _SHOW else "")


def _derive_seed(*parts) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------------------------- #
# data model
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Item:
    path: str  # POSIX path relative to DatasetSpec.root
    label: int


@dataclass
class DatasetSpec:
    root: Path
    classnames: list[str]
    splits: dict[str, list[Item]]
    source_format: str
    origin: dict[str, str]
    val_is_test: bool
    split_seed: int

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def fingerprint(self) -> str:
        """sha256 hex digest identifying the dataset contents.

        Hashes, one JSON line each, the sorted tuples ``[split, path, label, size_in_bytes]`` over all
        splits (``test`` is listed even when it is the val data), then the JSON list of class names.
        Files are stat'ed on every call, so a replaced image of another size changes the fingerprint.
        """
        sizes: dict[str, int] = {}
        rows = sorted((s, it.path, it.label) for s in SPLITS for it in self.splits.get(s, []))
        h = hashlib.sha256()
        for split, path, label in rows:
            if path not in sizes:
                try:
                    sizes[path] = os.stat(self.root / path).st_size
                except OSError as exc:
                    raise _error(
                        f"image {self.root / path} listed in the dataset cannot be read "
                        f"({exc.strerror or type(exc).__name__})",
                        "restore the file or rebuild the dataset description",
                    ) from None
            h.update(json.dumps([split, path, label, sizes[path]], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        h.update(json.dumps(list(self.classnames), ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()

    def describe(self) -> dict:
        """JSON-able summary: format, root, classes, and per split its count, origin and per-class counts."""
        splits = {}
        for split in SPLITS:
            items = self.splits.get(split, [])
            counts = [0] * len(self.classnames)
            for it in items:
                counts[it.label] += 1
            splits[split] = {
                "count": len(items),
                "origin": self.origin.get(split, "absent"),
                "min_per_class": min(counts) if counts else 0,
                "max_per_class": max(counts) if counts else 0,
                "per_class": {name: n for name, n in zip(self.classnames, counts)},
            }
        return {
            "format": self.source_format,
            "root": str(self.root),
            "num_classes": len(self.classnames),
            "classnames": list(self.classnames),
            "val_is_test": bool(self.val_is_test),
            "split_seed": int(self.split_seed),
            "splits": splits,
        }


@dataclass
class FewShotSet:
    k: int
    seed: int
    indices: np.ndarray  # int64 positions into the item list, grouped by class 0..C-1, K each
    with_replacement: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.indices) // self.k if self.k else 0

    @property
    def labels(self) -> np.ndarray:
        """Label of each sampled entry (0..C-1, K each), matching ``indices``."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int64), self.k)


# --------------------------------------------------------------------------------------------- #
# few-shot sampling
# --------------------------------------------------------------------------------------------- #
def sample_fewshot(items: list[Item], num_classes: int, k: int, seed: int) -> FewShotSet:
    """K items per class with the CoOp/Dassl recipe.

    ``rng = random.Random(seed)``; for each label 0..C-1 in order, take the positions of that class's
    items in dataset order; ``rng.sample(pool, K)`` if the class has at least K items, else
    ``rng.choices(pool, k=K)`` (with replacement; the label is recorded in ``with_replacement``).
    The result is grouped by class, in the order drawn.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise _error(f"invalid number of shots {k!r}", "pass a positive integer K (e.g. 1, 2, 4, 8, 16)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise _error(f"invalid number of classes {num_classes!r}", "pass the dataset's class count")
    k, num_classes = int(k), int(num_classes)
    if k * num_classes > MAX_FEWSHOT_ROWS:
        raise _error(f"a {k}-shot set of {num_classes} classes would hold {k * num_classes:,} rows, over the limit "
                     f"of {MAX_FEWSHOT_ROWS:,} (cachekit.data.MAX_FEWSHOT_ROWS)", "use a smaller K (--shots)")
    pools: list[list[int]] = [[] for _ in range(num_classes)]
    for pos, item in enumerate(items):
        if not 0 <= item.label < num_classes:
            raise _error(
                f"item {item.path} has label {item.label}, outside 0..{num_classes - 1}",
                "pass the dataset's num_classes, or fix the label",
            )
        pools[item.label].append(pos)
    rng = random.Random(seed)
    chosen: list[int] = []
    with_replacement: list[int] = []
    for label, pool in enumerate(pools):
        if not pool:
            raise _error(
                f"class {label} has no training images to sample {k}-shot from",
                "add training images for that class, or remove the class from the dataset",
            )
        if len(pool) >= k:
            chosen.extend(rng.sample(pool, k))
        else:
            chosen.extend(rng.choices(pool, k=k))
            with_replacement.append(label)
    return FewShotSet(k=k, seed=seed, indices=np.asarray(chosen, dtype=np.int64),
                      with_replacement=with_replacement)


# --------------------------------------------------------------------------------------------- #
# image loading
# --------------------------------------------------------------------------------------------- #
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _scale_high_depth(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float images -> 8-bit "L" without clipping the range.

    * I;16*: full 16-bit range, value / 257 (65535 -> 255).
    * I (32-bit int) and F (float): if all values lie in [0, 1] (float only) scale by 255; in
      [0, 255] keep; in [0, 65535] divide by 257; otherwise stretch min..max to 0..255.
      Non-finite float values are mapped to the finite min (NaN, -inf) or max (+inf).
    """
    arr = np.asarray(im)
    if im.mode in _INT16_MODES:
        return Image.fromarray(_to_uint8(arr.astype(np.float64) / 257.0), "L")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.fromarray(np.zeros(arr.shape, np.uint8), "L")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if not finite.all():
        arr = np.where(np.isposinf(arr), hi, np.where(finite, arr, lo))
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif lo >= 0.0 and hi <= 65535.0:
        out = arr / 257.0
    else:
        out = (arr - lo) * (255.0 / (hi - lo))
    return Image.fromarray(_to_uint8(out), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in _INT16_MODES or mode in ("I", "F"):
        return _scale_high_depth(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB.

    Handles 1, L, P (with transparency), CMYK, RGBA/LA (composited on white), I;16/I;16B/I and F
    (scaled to 8 bits, see :func:`_scale_high_depth`). Multi-frame files give their first frame; EXIF
    orientation is not applied (as in torchvision/Dassl loaders). Any failure - missing, not an image,
    corrupt, truncated, over :data:`MAX_PIXELS` - raises :class:`BadImageError` naming the path.
    """
    p = os.fspath(path)
    problem, _ = _file_problem(p)
    if problem is not None:  # a FIFO would block Image.open forever; a folder or device is no image either
        raise BadImageError(p, "file not found" if problem == "missing" else problem)
    try:
        # Pillow warns above Image.MAX_IMAGE_PIXELS (raised to MAX_PIXELS on import) and raises above
        # twice that; our own check below refuses everything over MAX_PIXELS before decoding.
        # (No warnings.catch_warnings here: it is not thread-safe.)
        with Image.open(p) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise BadImageError(p, _bomb_reason(width, height))
            if width * height > _CHECK_MEMORY_ABOVE:
                need = width * height * _DECODE_BYTES_PER_PIXEL
                have = available_memory()
                if need > have:
                    raise BadImageError(p, f"image is {width}x{height} = {width * height / 1e6:.0f} MP; decoding it "
                                           f"needs about {_gib(need)} of memory, {_gib(have)} are available")
            im.load()
            return _to_rgb(im)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise BadImageError(p, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(p, "not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(p, f"image larger than the {MAX_PIXELS // 1_000_000} MP decompression-bomb limit") from None
    except Exception as exc:  # corrupt / truncated / unsupported: Pillow raises many types
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise BadImageError(p, f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__) from None


#: Images above this many pixels are checked against the memory available before decoding: the
#: decode, the RGB conversion (alpha compositing, 16-bit scaling in float64) take up to this many bytes
#: per pixel at once.
_CHECK_MEMORY_ABOVE = 20_000_000
_DECODE_BYTES_PER_PIXEL = 24


def _bomb_reason(width: int, height: int) -> str:
    return (f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
            f"{MAX_PIXELS / 1e6:.0f} MP decompression-bomb limit (cachekit.data.MAX_PIXELS)")


def jpeg_bytes(path) -> np.ndarray | None:
    """The raw bytes (uint8 array) of a JPEG whose decode is the same image as :func:`load_image`'s, else None.

    For decoding on the device (torchvision.io.decode_jpeg, nvJPEG on CUDA): only baseline/progressive
    JPEGs in RGB or grayscale within :data:`MAX_PIXELS` qualify; CMYK/YCCK JPEGs, other formats and files
    Pillow cannot even open return None, and take the Pillow path (which names any problem).
    """
    p = os.fspath(path)
    if _file_problem(p)[0] is not None:  # e.g. a FIFO: the Pillow path names it
        return None
    try:
        with Image.open(p) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.size[0] * im.size[1] > MAX_PIXELS:
                return None
        with open(p, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8).copy()
    except Exception:  # unreadable: the Pillow path reports it
        return None


def check_image(path) -> str | None:
    """``None`` when :func:`load_image` succeeds on ``path`` (full decode), else the one-line reason."""
    try:
        load_image(path)
    except BadImageError as exc:
        return exc.reason
    return None


# --------------------------------------------------------------------------------------------- #
# class names
# --------------------------------------------------------------------------------------------- #
_WNID_LINE = re.compile(r"^n\d{8}\s+(\S.*)$")


def read_classnames(path) -> list[str]:
    """Class names from a text file: one per line, blank lines skipped, surrounding spaces stripped.

    ImageNet-style lines ``<wnid> <class name>`` (e.g. ``n01440764 tench``) are accepted when every line
    has that form; the wnid is dropped.
    """
    p = Path(path)
    text = read_text_file(p, "classnames file", "pass an existing UTF-8 text file with one class name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise _error(f"classnames file {p} is empty", "write one class name per line")
    matches = [_WNID_LINE.match(n) for n in names]
    if all(matches):
        names = [m.group(1).strip() for m in matches]
    for i, name in enumerate(names):
        if _text_problem(name):
            raise _error(f"class name {i} in classnames file {p} {_text_problem(name)}", "remove that character")
    _check_unique_names(names, f"classnames file {p}", "make every line a distinct class name")
    return names


def _check_unique_names(names: list[str], where: str, fix: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise _error(f"duplicate class name {name!r} in {where} (labels {seen[name]} and {i})", fix)
        seen[name] = i


# --------------------------------------------------------------------------------------------- #
# path checks
# --------------------------------------------------------------------------------------------- #
def _relpath_in_root(raw: str, root: Path, where: str) -> str:
    """Normalise a listed path to a POSIX path relative to root; refuse paths that escape root."""
    if not isinstance(raw, str) or not raw.strip():
        raise _error(f"empty image path at {where}", "give every row a path relative to the image root")
    problem = _text_problem(raw)
    if problem:
        raise _error(f"image path {_display(raw)!r} at {where} {problem}",
                     "fix the path (cachekit stores paths as UTF-8 text without NUL)")
    raw = raw.strip()
    if os.path.isabs(raw):
        norm = os.path.normpath(raw)
        for base in {os.path.normpath(str(root)), os.path.realpath(root)}:
            if norm.startswith(base.rstrip(os.sep) + os.sep):
                return Path(os.path.relpath(norm, base)).as_posix()
        raise _error(
            f"absolute image path {raw} at {where} is outside the image root {root}",
            "use paths relative to the image root, or pass --image-root set to a folder that contains them",
        )
    norm = posixpath.normpath(raw)
    if norm == ".." or norm.startswith("../"):
        raise _error(
            f"image path {raw} at {where} escapes the image root {root}",
            "use paths inside the image root (no leading '..'), or pass --image-root set to a common parent",
        )
    if norm == ".":
        raise _error(f"image path {raw!r} at {where} names the root folder, not a file",
                     "give the path of an image file")
    return norm


def _files_error(root: Path, problems: list[tuple[str, str]], listed: bool) -> CachekitError:
    """One line for unusable image files: (relative path, reason) each."""
    n = len(problems)
    if all(r == "missing" for _, r in problems) and listed:
        return _error(f"{n} listed image file(s) missing under {root}: {_first_few([p for p, _ in problems])}",
                      "check --image-root (paths are relative to it) or remove those entries")
    if all(r.startswith("missing") for _, r in problems):
        return _error(f"{n} image file(s) missing under {root} (broken links): "
                      f"{_first_few([p for p, _ in problems])}", "fix or remove the broken links")
    shown = _first_few([f"{p} ({r})" for p, r in problems])
    fixes = []
    if any("permission denied" in r for _, r in problems):
        fixes.append("make them readable (e.g. chmod a+r, and a+x on their folders)")
    if any("regular file" in r or "folder" in r for _, r in problems):
        fixes.append("replace them with image files")
    if any(r.startswith("missing") for _, r in problems):
        fixes.append("restore the missing ones")
    return _error(f"{n} image file(s) under {root} cannot be used: {shown}", f"{' or '.join(fixes) or 'fix them'}, "
                  "or remove them from the dataset")


def _inspect_files(root: Path, splits: dict[str, list[Item]]) -> dict[str, os.stat_result]:
    """stat of every listed file; an error naming the missing, unreadable and special (FIFO...) ones."""
    stats: dict[str, os.stat_result] = {}
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for split in SPLITS:
        for it in splits.get(split, []):
            if it.path in seen:
                continue
            seen.add(it.path)
            problem, st = _file_problem(root / it.path)
            if problem:
                problems.append((it.path, problem))
            else:
                stats[it.path] = st
    if problems:
        raise _files_error(root, problems, listed=True)
    return stats


# --------------------------------------------------------------------------------------------- #
# integrity: one image, one class, one of train / val / test
# --------------------------------------------------------------------------------------------- #
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except PermissionError:
        raise _error(f"cannot read image {path}: permission denied",
                     "make it readable (e.g. chmod a+r) or remove it from the dataset") from None
    except OSError as exc:
        raise _error(f"cannot read image {path} ({exc.strerror or type(exc).__name__})",
                     "restore the file or remove it from the dataset") from None
    return h.hexdigest()


@dataclass
class _Identity:
    """Which listed paths are one image: the same file (device and inode: links, hard links, a
    symlinked folder) or the same bytes (sha256, computed only for files that share a size)."""

    file: dict[str, tuple]  # path -> ("file", dev, ino)
    key: dict[str, tuple]  # path -> the file key, or ("sha256", digest) when the bytes were hashed

    @classmethod
    def of(cls, root: Path, stats: dict[str, os.stat_result]) -> "_Identity":
        file = {p: ("file", st.st_dev, st.st_ino) for p, st in stats.items()}
        key = dict(file)
        by_size: dict[int, list[str]] = {}
        for p, st in stats.items():
            if st.st_size > 0:  # empty files are no images: decoding names them
                by_size.setdefault(st.st_size, []).append(p)
        for paths in by_size.values():
            if len({file[p] for p in paths}) < 2:
                continue
            digests: dict[tuple, str] = {}
            for p in paths:
                if file[p] not in digests:
                    digests[file[p]] = _sha256_file(root / p)
                key[p] = ("sha256", digests[file[p]])
        return cls(file, key)

    def how(self, a: str, b: str) -> str:
        return "the same file" if self.file[a] == self.file[b] else "the same content"


def _pairs(pairs: list[tuple[str, str, str]]) -> str:
    return _first_few([f"{a} = {b} ({how})" for a, b, how in pairs])


def _check_integrity(given: dict[str, list[Item]], ident: _Identity, class_keys: list[str], source: str) -> bool:
    """Refuse an image in two classes, in train and in val/test, linked twice into one split, or in part of
    val and of test; return True when val and test list exactly the same images (then test is val)."""
    owner: dict[tuple, Item] = {}
    clash = []
    for split in SPLITS:
        for it in given.get(split) or []:
            k = ident.key[it.path]
            other = owner.setdefault(k, it)
            if other.label != it.label:
                clash.append((f"{other.path} [{class_keys[other.label]}]", f"{it.path} [{class_keys[it.label]}]",
                              ident.how(other.path, it.path)))
    if clash:
        raise _error(f"{len(clash)} image(s) of {source} are in two classes: {_pairs(clash)}",
                     "keep each image in one class only (remove the copy, the link, or the entry)")

    for split in SPLITS:
        first: dict[tuple, str] = {}
        twice = []
        for it in given.get(split) or []:
            k = ident.file[it.path]
            if k in first and first[k] != it.path:
                twice.append((first[k], it.path, "the same file"))
            first.setdefault(k, it.path)
        if twice:
            raise _error(f"{len(twice)} image(s) of {source} are listed twice in {split} under other names: "
                         f"{_pairs(twice)}", "remove the link (or the second entry) so that each image is listed once")

    train = {}
    for it in given.get("train") or []:
        train.setdefault(ident.key[it.path], it.path)
    for split in ("val", "test"):
        both = [it.path for it in given.get(split) or [] if ident.key[it.path] in train]
        if both:
            shown = [p if train[ident.key[p]] == p else f"{p} = {train[ident.key[p]]} ({ident.how(p, train[ident.key[p]])})"
                     for p in both]
            raise _error(
                f"{len(both)} image(s) of {source} are in both train and {split}: {_first_few(shown)}",
                f"remove them from train or from {split} (evaluation images must not be training images)",
            )

    val = {ident.key[it.path]: it.path for it in given.get("val") or []}
    test = {ident.key[it.path]: it.path for it in given.get("test") or []}
    common = val.keys() & test.keys()
    if not common:
        return False
    if val.keys() == test.keys():
        return True
    only = [val[k] for k in val if k not in test] + [test[k] for k in test if k not in val]
    shared = [val[k] for k in val if k in common]
    raise _error(
        f"{len(common)} image(s) of {source} are in both val and test ({_first_few(shared)}), but "
        f"{len(only)} are in only one of them ({_first_few(only)})",
        "make val and test disjoint, or list exactly the same images as val and as test (then test is val, "
        "and every output says so)",
    )


def _missing_labels(present: set[int], num_classes: int, limit: int = _SHOW) -> list[int]:
    """The first `limit` labels of 0..num_classes-1 not in `present` (never builds the whole range)."""
    out = []
    for i in range(num_classes):
        if i not in present:
            out.append(i)
            if len(out) >= limit:
                break
    return out


def _check_train_classes(train_labels, num_classes: int, names, source: str, how: str = "") -> None:
    """Every class 0..C-1 needs a train image (few-shot sets are sampled from train). Checked on the
    labels alone, before anything of size C is allocated."""
    present = {lab for lab in train_labels if 0 <= lab < num_classes}
    n_missing = num_classes - len(present)
    if n_missing <= 0:
        return
    first = _missing_labels(present, num_classes)

    def name(i):
        return f"{i} ({names(i)!r})" if names is not None and names(i) is not None else str(i)

    shown = ", ".join(name(i) for i in first) + (", ..." if n_missing > len(first) else "")
    raise _error(
        f"{n_missing:,} of the {num_classes:,} classes of {source} have no train images: label(s) {shown}{how}",
        "give every class train images (few-shot sets are sampled from train); with integer labels, number the "
        "classes 0..C-1 without gaps",
    )


# --------------------------------------------------------------------------------------------- #
# split carving and the common final step
# --------------------------------------------------------------------------------------------- #
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _carve_counts(n: int, fractions: list[float]) -> list[int]:
    """How many of n items each carved split takes (fractions in take order).

    round-half-up(n * fraction); at least 1 per split with fraction > 0 when n >= 3; at least 1 item is
    always left for train (the largest carved count is reduced, the later split on ties).
    """
    counts = [_round_half_up(n * f) for f in fractions]
    if n >= 3:
        counts = [max(1, c) if f > 0 else c for c, f in zip(counts, fractions)]
    while n >= 1 and sum(counts) > n - 1:
        j = max(range(len(counts)), key=lambda i: (counts[i], i))
        counts[j] -= 1
    return counts


def _carve(train: list[Item], class_keys: list[str], split_seed: int,
           fractions: dict[str, float], same=None) -> tuple[list[Item], dict[str, list[Item]]]:
    """Carve splits out of train, per class (stratified) with a per-class seeded shuffle.

    For each class: its items in dataset order are shuffled by ``random.Random(seed)`` with
    ``seed = first 8 bytes of sha256("cachekit-split\\0{split_seed}\\0{class key}")``; the first items go to
    test, the next to val (in the order of ``fractions``), the rest stay in train. Every list keeps the
    dataset order.

    ``same`` (position -> key, optional): copies of one image (same key) are carved together, so that no
    copy stays in train while another goes to val or test. A split takes a whole group when its first
    copy comes up in the shuffled order (it may then take a little more than its count; train keeps at
    least one group). Without copies this is exactly the rule above.
    """
    by_class: dict[int, list[int]] = {}
    for pos, it in enumerate(train):
        by_class.setdefault(it.label, []).append(pos)
    names = list(fractions)
    assigned: dict[int, str] = {}
    for label, positions in by_class.items():
        counts = _carve_counts(len(positions), [fractions[s] for s in names])
        order = list(positions)
        random.Random(_derive_seed("cachekit-split", split_seed, class_keys[label])).shuffle(order)
        if same is None:
            start = 0
            for split, count in zip(names, counts):
                for pos in order[start:start + count]:
                    assigned[pos] = split
                start += count
            continue
        groups: dict[object, list[int]] = {}
        for pos in order:
            groups.setdefault(same(pos), []).append(pos)
        units = list(groups.values())  # in the order of each group's first copy
        u = 0
        for split, count in zip(names, counts):
            taken = 0
            while taken < count and u < len(units) - 1:  # the last group stays in train
                for pos in units[u]:
                    assigned[pos] = split
                taken += len(units[u])
                u += 1
    carved = {s: [it for pos, it in enumerate(train) if assigned.get(pos) == s] for s in names}
    rest = [it for pos, it in enumerate(train) if pos not in assigned]
    return rest, carved


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                or not 0.0 <= f < 1.0):
            raise _error(f"invalid {name} {f!r}", f"pass {name} as a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise _error(f"val_fraction {val_fraction} + test_fraction {test_fraction} leave nothing for train",
                     "make the two fractions sum to less than 1 (defaults 0.2 and 0.3)")


def _finalize(*, root: Path, classnames: list[str], class_keys: list[str],
              given: dict[str, list[Item]], source_format: str, source: str,
              val_fraction: float, test_fraction: float, split_seed: int,
              classnames_file, stats: dict[str, os.stat_result] | None = None) -> DatasetSpec:
    """Apply the split rules (carve / val-is-test), class-name override and the final checks.

    `stats`: the stat of every listed file when the caller has them (ImageFolder); else every listed file
    is checked here (exists, is a regular file, is readable)."""
    if not any(given.get(s) for s in SPLITS):
        raise _error(f"no images at all in {source}", "add images (see docs/data-formats.md for the layouts)")
    train = given.get("train") or []
    if not train:
        raise _error(f"{source} has no train images", "add a train split (few-shot sets are sampled from train)")
    for split in SPLITS:
        for it in given.get(split) or []:
            if not 0 <= it.label < len(classnames):  # a loader bug, never user input: labels are checked there
                raise _error(f"{it.path} in {source} has label {it.label}, outside 0..{len(classnames) - 1}",
                             "report this bug")
    if classnames_file is not None:
        names = read_classnames(classnames_file)
        if len(names) != len(classnames):
            raise _error(
                f"classnames file {classnames_file} has {len(names)} names but {source} has "
                f"{len(classnames)} classes",
                f"give exactly {len(classnames)} lines, in label order",
            )
        classnames = names
    _check_unique_names(classnames, source, "rename the classes so that every class name is distinct")
    _check_train_classes((it.label for it in train), len(classnames), lambda i: classnames[i], source)
    if stats is None:
        stats = _inspect_files(root, given)
    ident = _Identity.of(root, stats)
    listed_twice = _check_integrity(given, ident, class_keys, source)

    splits: dict[str, list[Item]] = {}
    origin: dict[str, str] = {}
    val_is_test = False
    has_val, has_test = bool(given.get("val")), bool(given.get("test"))
    same = (lambda pos: ident.key[train[pos].path])
    if has_val and has_test and listed_twice:
        splits = {"train": list(train), "val": list(given["val"]), "test": list(given["val"])}
        origin = {"train": "given", "val": "given", "test": "same as val (val and test list the same images)"}
        val_is_test = True
    elif has_val and has_test:
        splits = {s: list(given[s]) for s in SPLITS}
        origin = {s: "given" for s in SPLITS}
    elif has_val:
        splits = {"train": list(train), "val": list(given["val"]), "test": list(given["val"])}
        origin = {"train": "given", "val": "given", "test": "same as val"}
        val_is_test = True
    elif has_test:
        rest, carved = _carve(train, class_keys, split_seed, {"val": val_fraction}, same)
        splits = {"train": rest, "val": carved["val"], "test": list(given["test"])}
        origin = {"train": "given minus carved val",
                  "val": f"carved from train (seed {split_seed}, fraction {val_fraction})",
                  "test": "given"}
    else:
        rest, carved = _carve(train, class_keys, split_seed, {"test": test_fraction, "val": val_fraction}, same)
        splits = {"train": rest, "val": carved["val"], "test": carved["test"]}
        origin = {"train": "given minus carved val and test",
                  "val": f"carved from train (seed {split_seed}, fraction {val_fraction})",
                  "test": f"carved from train (seed {split_seed}, fraction {test_fraction})"}
    _check_train_classes((it.label for it in splits["train"]), len(classnames), lambda i: classnames[i], source)
    return DatasetSpec(root=root, classnames=list(classnames), splits=splits, source_format=source_format,
                       origin=origin, val_is_test=val_is_test, split_seed=split_seed)


# --------------------------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------------------------- #
def _permission_error(folder, what: str = "folder") -> CachekitError:
    return _error(f"cannot read {what} {folder}: permission denied",
                  "make it readable (e.g. chmod a+rx) or remove it from the dataset")


def _scandir(folder) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise _permission_error(folder) from None
    except OSError as exc:
        raise _error(f"cannot list {folder} ({exc.strerror or type(exc).__name__})",
                     "check that the folder exists and is readable") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _subdirs(folder: Path) -> list[str]:
    names = [e.name for e in _scandir(folder) if not _is_hidden(e.name) and _is_dir(e)]
    for name in names:
        problem = _text_problem(name)
        if problem:
            raise _error(f"folder name {_display(os.path.join(folder, name))} {problem}",
                         "rename it (cachekit stores class and path names as UTF-8 text)")
    return names


def _has_images_directly(folder: Path) -> bool:
    return any(not _is_hidden(e.name) and _is_image_name(e.name) and not _is_dir(e) for e in _scandir(folder))


def _within(path: str, folder: str) -> bool:
    """path == folder or lies inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan_class_folder(folder: Path, root: Path) -> tuple[list[tuple[str, os.stat_result]], list[tuple[str, str]]]:
    """Images under `folder`, recursively (symlinked folders are followed), as (path relative to root, stat)
    sorted by path; and the unusable ones as (path, reason): broken links, FIFOs and other special files,
    unreadable files. An unreadable folder, a symlink loop (a link to the folder itself or to a folder
    above it) or a name that is not UTF-8 is an error."""
    root_real, top_real = os.path.realpath(root), os.path.realpath(folder)
    if _within(root_real, top_real):
        raise _error(f"symlink loop: class folder {folder} points to {top_real}, which holds the whole dataset",
                     "replace the link by a folder of that class's images")
    found: list[tuple[str, os.stat_result]] = []
    bad: list[tuple[str, str]] = []
    visited = {top_real}
    stack = [str(folder)]
    while stack:
        dirpath = stack.pop()
        for e in _scandir(dirpath):
            if _is_hidden(e.name):
                continue
            full = os.path.join(dirpath, e.name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if _is_dir(e):
                real = os.path.realpath(full)
                if _within(top_real, real) or _within(root_real, real):
                    raise _error(f"symlink loop: {rel} in {root} points to {real}, a folder that contains it",
                                 "remove the link (a class folder must not link to itself or to a folder above it)")
                if real in visited:
                    raise _error(f"folder {real} is reached twice inside class folder {folder} (again through {rel})",
                                 "remove the link that leads to it a second time")
                problem = _text_problem(e.name)
                if problem:
                    raise _error(f"folder name {_display(full)} {problem}",
                                 "rename it (cachekit stores paths as UTF-8 text)")
                visited.add(real)
                stack.append(full)
                continue
            if not _is_image_name(e.name):
                continue
            problem = _text_problem(e.name)
            if problem:
                raise _error(f"file name {_display(full)} {problem}", "rename it (cachekit stores paths as UTF-8 text)")
            problem, st = _file_problem(full)
            if problem:
                bad.append((rel, problem))
            else:
                found.append((rel, st))
    found.sort(key=lambda x: x[0])
    return found, bad


def _load_imagefolder(root: Path, classnames_file, val_fraction, test_fraction, split_seed) -> DatasetSpec:
    dirs = _subdirs(root)
    split_dirs: dict[str, str] = {}
    for d in dirs:
        if d.lower() in SPLITS:
            if d.lower() in split_dirs:
                raise _error(f"{root} has both {split_dirs[d.lower()]}/ and {d}/",
                             "keep one folder per split (train, val, test)")
            split_dirs[d.lower()] = d
    if split_dirs and len(split_dirs) < len(dirs):
        others = [d for d in dirs if d.lower() not in SPLITS]
        raise _error(
            f"{root} mixes split folders ({', '.join(sorted(split_dirs.values()))}) with other folders "
            f"({_first_few(others)})",
            "put every class folder under train/ val/ test/, or rename a class folder called train/val/test",
        )
    if split_dirs:
        if "train" not in split_dirs:
            raise _error(f"{root} has {', '.join(split_dirs[s] + '/' for s in SPLITS if s in split_dirs)} "
                         f"but no train/ folder", "add train/ with one folder per class")
        trees = {s: root / split_dirs[s] for s in SPLITS if s in split_dirs}
        root_real = os.path.realpath(root)
        for s, tree in trees.items():
            if _within(root_real, os.path.realpath(tree)):
                raise _error(f"symlink loop: split folder {tree} points to {os.path.realpath(tree)}, which holds "
                             "the whole dataset", "replace the link by a folder of that split's class folders")
    else:
        trees = {"train": root}

    folders: list[str] | None = None
    for split, tree in trees.items():
        classes = _subdirs(tree)
        if not classes:
            where = tree if split_dirs else root
            if _has_images_directly(where):
                raise _error(f"{where} holds images but no class folders",
                             "put the images in one sub-folder per class (the folder name is the class name)")
            raise _error(f"no images at all in {where} (no class folders)",
                         "pass a folder with one sub-folder of images per class, a split .json, or a manifest")
        if folders is None:
            folders = classes
        elif classes != folders:
            extra = sorted(set(classes) - set(folders))
            lacking = sorted(set(folders) - set(classes))
            detail = "; ".join(x for x in (
                f"extra: {_first_few(extra)}" if extra else "",
                f"missing: {_first_few(lacking)}" if lacking else "") if x)
            raise _error(f"class folders of {tree} differ from those of {trees['train']} ({detail})",
                         "give every split folder the same class folders")
    assert folders is not None

    given: dict[str, list[Item]] = {}
    stats: dict[str, os.stat_result] = {}
    for split, tree in trees.items():
        items: list[Item] = []
        bad_all: list[tuple[str, str]] = []
        for label, cls in enumerate(folders):
            found, bad = _scan_class_folder(tree / cls, root)
            bad_all.extend(bad)
            if not found and not bad:
                raise _error(
                    f"empty class folder {tree / cls} (no {'/'.join(sorted(IMAGE_EXTENSIONS))} images)",
                    "add images to it or remove the folder",
                )
            items.extend(Item(p, label) for p, _ in found)
            stats.update(found)
        if bad_all:
            raise _files_error(root, bad_all, listed=False)
        given[split] = items

    classnames = [cls.replace("_", " ") for cls in folders]
    seen: dict[str, str] = {}
    for cls, name in zip(folders, classnames):
        if name in seen:
            raise _error(f"duplicate class name {name!r} from folders {seen[name]!r} and {cls!r} in {root}",
                         "rename one of the folders ('_' counts as a space)")
        seen[name] = cls
    return _finalize(root=root, classnames=classnames, class_keys=folders, given=given,
                     source_format="imagefolder", source=str(root), val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed, classnames_file=classnames_file,
                     stats=stats)


# --------------------------------------------------------------------------------------------- #
# CoOp split JSON
# --------------------------------------------------------------------------------------------- #
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _image_root_dir(image_root, source: Path) -> Path:
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(image_root))))
    if _text_problem(str(root)):
        raise _error(f"image root {_display(root)} {_text_problem(str(root))}",
                     "rename the folder (cachekit stores paths as UTF-8 text)")
    try:
        is_dir = root.is_dir()
    except OSError:
        is_dir = False
    if not is_dir:
        raise _error(f"image root {root} (for {source}) is not a directory",
                     "pass --image-root pointing at the folder the listed paths are relative to")
    return root


def _parse_json(text: str):
    """json.loads with every failure as a _JsonProblem (syntax, nesting too deep, a number too long)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _JsonProblem(exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise _JsonProblem("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise _JsonProblem(str(exc).splitlines()[0] if str(exc) else "invalid value") from None


class _JsonProblem(Exception):
    def __init__(self, msg: str, lineno: int | None = None, colno: int | None = None):
        super().__init__(msg)
        self.msg, self.lineno, self.colno = msg, lineno, colno

    @property
    def where(self) -> str:
        return f"at line {self.lineno} column {self.colno}: {self.msg}" if self.lineno else f"({self.msg})"


def _load_coop(path: Path, image_root, classnames_file, val_fraction, test_fraction, split_seed) -> DatasetSpec:
    if image_root is None:
        raise _error(f"split file {path} needs an image folder",
                     "pass --image-root with the folder its paths are relative to (e.g. .../oxford_pets/images)")
    root = _image_root_dir(image_root, path)
    text = read_text_file(path, "split file", "pass a readable UTF-8 JSON split file")
    try:
        obj = _parse_json(text)
    except _JsonProblem as exc:
        raise _error(f"malformed JSON in {path} {exc.where}",
                     "fix the file (a CoOp split file is {\"train\": [[path, label, classname], ...], ...})") from None
    if not isinstance(obj, dict) or not any(s in obj for s in SPLITS):
        raise _error(f"{path} is not a CoOp split file (expected a JSON object with keys train, val, test)",
                     "pass a split_zhou_*.json file, a class-folder tree, or a .csv/.jsonl manifest")

    names_by_label: dict[int, str] = {}
    given: dict[str, list[Item]] = {}
    for split in SPLITS:
        entries = obj.get(split)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise _error(f"{path}: \"{split}\" is not a list", "make it a list of [path, label, classname]")
        items: list[Item] = []
        seen_paths: dict[str, int] = {}
        for i, entry in enumerate(entries):
            where = f"{path} {split}[{i}]"
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or not _is_int(entry[1]) or not isinstance(entry[2], str)):
                raise _error(f"malformed entry {where}: {_display(json.dumps(entry)[:80])}",
                             "make every entry [relative_path, int_label, classname]")
            rel, label, name = entry
            if label < 0:
                raise _error(f"label {label} out of range at {where}", "labels are 0-based non-negative integers")
            rel = _relpath_in_root(rel, root, where)
            if rel in seen_paths:
                raise _error(f"duplicate path {rel} in {path} {split}[{seen_paths[rel]}] and [{i}]",
                             "list each image once per split")
            seen_paths[rel] = i
            name = name.strip()
            if _text_problem(name):
                raise _error(f"class name {_display(name)!r} at {where} {_text_problem(name)}", "fix the class name")
            if names_by_label.setdefault(label, name) != name:
                raise _error(f"conflicting class names for label {label} in {path}: "
                             f"{names_by_label[label]!r} and {name!r} (at {where})",
                             "give each label a single class name")
            items.append(Item(rel, label))
        given[split] = items

    if not names_by_label:
        raise _error(f"no images at all in {path}", "add entries [path, label, classname] to train, val and test")
    max_label = max(names_by_label)
    num_classes = max_label + 1
    names_from_file = None
    if classnames_file is not None:
        names_from_file = read_classnames(classnames_file)
        if len(names_from_file) < num_classes:
            raise _error(f"label {max_label} in {path} is out of range for the {len(names_from_file)} names in "
                         f"{classnames_file}", "give one class name per label in the classnames file")
        num_classes = len(names_from_file)  # the file defines the class count
    _check_train_classes((it.label for it in given.get("train") or []), num_classes, names_by_label.get,
                         f"split file {path}", "" if names_from_file else f" (labels go up to {max_label})")
    classnames = [names_by_label.get(i, f"class_{i}") for i in range(num_classes)]
    return _finalize(root=root, classnames=classnames, class_keys=[str(i) for i in range(num_classes)],
                     given=given, source_format="coop", source=str(path), val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed, classnames_file=classnames_file)


# --------------------------------------------------------------------------------------------- #
# manifests (.csv / .jsonl)
# --------------------------------------------------------------------------------------------- #
_INT_TEXT = re.compile(r"^[+-]?\d+$")
#: An integer label with more digits than this is out of any range (int64 has 19).
_MAX_LABEL_DIGITS = 18


def _read_csv_rows(path: Path) -> list[tuple[int, object, object, object]]:
    text = read_text_file(path, "manifest", "pass a readable UTF-8 CSV file with a header row path,label,split")
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        try:
            header = next(reader)
        except StopIteration:
            raise _error(f"manifest {path} is empty", "write a header row path,label,split and one row per image") from None
        cols = [h.strip().lower() for h in header]
        index = {}
        for col in ("path", "label", "split"):
            if col not in cols:
                raise _error(f"manifest {path} line 1: header has no '{col}' column (found: {', '.join(cols)[:200]})",
                             "start the file with a header row containing path,label,split")
            index[col] = cols.index(col)
        need = max(index.values()) + 1
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < need:
                raise _error(f"malformed CSV in {path} line {reader.line_num}: {len(row)} field(s), "
                             f"expected at least {need}", "give every row path,label,split")
            rows.append((reader.line_num, row[index["path"]], row[index["label"]].strip(), row[index["split"]]))
    except csv.Error as exc:
        raise _error(f"malformed CSV in {path} line {reader.line_num}: {exc}", "fix the quoting on that line") from None
    # labels: all integers -> int labels; otherwise class names
    if rows and all(_INT_TEXT.match(r[2]) for r in rows):
        for ln, _, lab, _ in rows:
            if len(lab.lstrip("+-")) > _MAX_LABEL_DIGITS:
                raise _error(f"label {lab[:24]}{'...' if len(lab) > 24 else ''} out of range in {path} line {ln}",
                             "use 0-based class numbers 0..C-1")
        rows = [(ln, p, int(lab), s) for ln, p, lab, s in rows]
    return rows


def _read_jsonl_rows(path: Path) -> list[tuple[int, object, object, object]]:
    rows = []
    lines = read_text_file(path, "manifest", "pass a readable UTF-8 JSONL file").split("\n")
    kind = None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = _parse_json(line)
        except _JsonProblem as exc:
            raise _error(f"malformed JSON in {path} line {n}: {exc.msg}",
                         "write one JSON object per line, e.g. {\"path\": \"a/1.jpg\", \"label\": \"cat\", \"split\": \"train\"}") from None
        if not isinstance(obj, dict) or not all(k in obj for k in ("path", "label", "split")):
            raise _error(f"malformed JSONL in {path} line {n}: expected an object with keys path, label, split",
                         "write one JSON object per line with path, label and split")
        label = obj["label"]
        this = "int" if _is_int(label) else "str" if isinstance(label, str) else None
        if this is None:
            raise _error(f"invalid label {_display(json.dumps(label)[:40])} in {path} line {n}",
                         "use a class name (string) or a 0-based integer label")
        if kind is None:
            kind = this
        elif kind != this:
            raise _error(f"label {_display(json.dumps(label)[:40])} in {path} line {n} is a{'n integer' if this == 'int' else ' string'} "
                         f"but earlier labels are {'integers' if kind == 'int' else 'strings'}",
                         "use either class names or integer labels throughout")
        rows.append((n, obj["path"], label.strip() if isinstance(label, str) else label, obj["split"]))
    return rows


def _load_manifest(path: Path, image_root, classnames_file, val_fraction, test_fraction, split_seed) -> DatasetSpec:
    suffix = path.suffix.lower()
    fmt = "CSV" if suffix == ".csv" else "JSONL"
    root = _image_root_dir(image_root, path) if image_root is not None else path.parent.absolute()
    rows = _read_csv_rows(path) if suffix == ".csv" else _read_jsonl_rows(path)
    if not rows:
        raise _error(f"no images at all in manifest {path} (no rows)", "add one row per image: path,label,split")
    source = f"{fmt} manifest {path}"

    int_labels = _is_int(rows[0][2])
    names_from_file = read_classnames(classnames_file) if classnames_file is not None else None
    splits_of = []
    for line, _, _, raw_split in rows:
        split = raw_split.strip().lower() if isinstance(raw_split, str) else None
        if split not in SPLITS:
            raise _error(f"unknown split {_display(json.dumps(raw_split)[:40])} in {path} line {line}",
                         "use train, val or test")
        splits_of.append(split)
    if int_labels:
        limit = len(names_from_file) if names_from_file is not None else None
        for line, _, label, _ in rows:
            if label < 0 or (limit is not None and label >= limit):
                rng_text = f"0..{limit - 1} ({limit} names in {classnames_file})" if limit else "0 or more"
                raise _error(f"label {label} out of range in {path} line {line}, expected {rng_text}",
                             "fix the label or the classnames file")
        max_label = max(r[2] for r in rows)
        num_classes = limit if limit is not None else max_label + 1
        _check_train_classes((r[2] for r, s in zip(rows, splits_of) if s == "train"), num_classes, None, source,
                             "" if limit else f" (labels go up to {max_label})")
        classnames = [f"class_{i}" for i in range(num_classes)]
        class_keys = [str(i) for i in range(num_classes)]
        label_of = None
    else:
        for line, _, label, _ in rows:
            if not label:
                raise _error(f"empty label in {path} line {line}", "give every row a class name or integer label")
            if _text_problem(label):
                raise _error(f"label {_display(label)!r} in {path} line {line} {_text_problem(label)}",
                             "fix the class name")
        class_keys = sorted({r[2] for r in rows})
        if names_from_file is not None and set(class_keys) <= set(names_from_file):
            # The file lists the manifest's own class names: it sets the label order and never
            # renames a class by position. (A file of other names renames the sorted classes.)
            class_keys = list(names_from_file)
            classnames_file = None
        classnames = list(class_keys)
        label_of = {name: i for i, name in enumerate(class_keys)}

    given: dict[str, list[Item]] = {s: [] for s in SPLITS}
    seen: dict[tuple[str, str], int] = {}
    for (line, raw_path, label, _), split in zip(rows, splits_of):
        where = f"{path} line {line}"
        if not isinstance(raw_path, str):
            raise _error(f"path {_display(json.dumps(raw_path)[:60])} in {where} is not a string",
                         "give a relative path")
        rel = _relpath_in_root(raw_path, root, where)
        if (split, rel) in seen:
            raise _error(f"duplicate {split} entry {rel} in {path} lines {seen[(split, rel)]} and {line}",
                         "list each image once per split")
        seen[(split, rel)] = line
        given[split].append(Item(rel, label if label_of is None else label_of[label]))
    return _finalize(root=root, classnames=classnames, class_keys=class_keys, given=given,
                     source_format="manifest", source=source, val_fraction=val_fraction,
                     test_fraction=test_fraction, split_seed=split_seed, classnames_file=classnames_file)


# --------------------------------------------------------------------------------------------- #
# entry point
# --------------------------------------------------------------------------------------------- #
def load_dataset(data, image_root=None, classnames_file=None, val_fraction=0.2, test_fraction=0.3,
                 split_seed=1) -> DatasetSpec:
    """Read a dataset description (ImageFolder tree, CoOp split .json, or .csv/.jsonl manifest).

    ``image_root``: folder that listed paths are relative to (required for a split .json, optional
    for manifests - default the manifest's folder, not allowed for ImageFolder trees).
    ``classnames_file``: one name per line overriding the class names (in label order).
    ``val_fraction``/``test_fraction``/``split_seed``: used only when a split must be carved from train.

    Every file is checked before anything is returned: the same image (the same file, or the same bytes)
    in two classes or in train and val/test is an error, and so is an image in part of val and of test
    (val and test listing exactly the same images is taken as asked for: test is then val, `val_is_test`).
    """
    if data is None or (isinstance(data, str) and not data.strip()):
        raise _error("no dataset given", "pass DATA: a class-folder tree, a split .json, or a .csv/.jsonl manifest")
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(data))))
    if _text_problem(str(path)):
        raise _error(f"dataset path {_display(path)} {_text_problem(str(path))}",
                     "rename it (cachekit stores paths as UTF-8 text)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(f"dataset path {path} does not exist",
                     "pass an existing class-folder tree, split .json, or .csv/.jsonl manifest") from None
    except PermissionError:
        raise _permission_error(path, "dataset path") from None
    except OSError as exc:
        raise _error(f"cannot read dataset path {path} ({exc.strerror or type(exc).__name__})",
                     "pass an existing class-folder tree, split .json, or .csv/.jsonl manifest") from None
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
        raise _error(f"invalid split seed {split_seed!r}", "pass an integer seed")
    split_seed = int(split_seed)
    _check_fractions(val_fraction, test_fraction)
    args = (classnames_file, val_fraction, test_fraction, split_seed)

    if stat.S_ISDIR(st.st_mode):
        split_files = sorted(p for p in _scandir_paths(path) if p.name.startswith("split_zhou_")
                             and p.name.endswith(".json") and p.is_file())
        if len(split_files) > 1:
            raise _error(f"{path} holds several split files ({', '.join(p.name for p in split_files)})",
                         "pass the one you want as DATA, with --image-root")
        if split_files:
            return _load_coop(split_files[0], image_root, *args)
        if image_root is not None:
            raise _error(f"--image-root {image_root} given but {path} is a class-folder tree",
                         "drop --image-root (it is only for a split .json or a manifest)")
        return _load_imagefolder(path, *args)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv", ".jsonl"):
        raise _error(f"unknown dataset format for {path} (suffix {suffix or 'none'!r})",
                     "pass a class-folder tree, a CoOp split .json, or a .csv/.jsonl manifest")
    if not stat.S_ISREG(st.st_mode):
        raise _error(f"dataset path {path} is {_file_kind(st.st_mode)}, not a regular file",
                     "pass a class-folder tree, a split .json, or a .csv/.jsonl manifest")
    if suffix == ".json":
        return _load_coop(path, image_root, *args)
    return _load_manifest(path, image_root, *args)


def _scandir_paths(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _scandir(folder)]
