"""The cache schema, declared once: every group, dataset and attribute of a cachekit cache.

Everything that touches the HDF5 layout uses this module: the writer (`cachekit.extraction`), the reader
(`cachekit.cache`), `cachekit.verify`, `cachekit.info`, and docs/cache-format.md (its layout table is
generated from :data:`FIELDS` and `tests/test_cache_format.py` keeps the two equal):

    python -m cachekit.schema                           # print the layout table (Markdown)
    python -m cachekit.schema --docs docs/cache-format.md   # rewrite the table in the document

Names: object paths are absolute (`/splits/val/labels`); build them with :func:`split_path`,
:func:`fewshot_path`, :func:`attnpool_path`, :func:`bad_images_path` and the constants below; attribute
names are the members of :class:`Attr` (root), :class:`SplitAttr`, :class:`FewshotAttr`,
:class:`TextAttr` and :class:`AttnpoolAttr`, plus :data:`CHECKSUM` (on every dataset).

Each :class:`Field` gives a path pattern (placeholders `{split}`, `{K}`, `{seed}`, `{param}`), its kind,
its dtype (datasets) or type (attributes), whether the attribute holds JSON text and of what JSON type,
its shape rule, and a one-line meaning. :func:`check` compares a file with the schema without reading
any array (presence, kind, dtype, shape, attribute types and values, JSON, the attribute checksums);
:func:`dataset_checksum` / :class:`Checksum` hash a dataset's dtype, shape and contents (strings in a
canonical form, so the storage of a string does not change its checksum).

Integrity: every dataset carries `@sha256` (:data:`CHECKSUM`); the root attribute `@attrs_sha256`
(:data:`ATTRS_CHECKSUM`, written last by :func:`seal`) maps every other attribute of the file to the
sha256 of its value, so an edited attribute is found and named.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import h5py
import numpy as np

FORMAT = "cachekit"
SCHEMA_VERSION = 2
SPLITS = ("train", "val", "test")
DENSE_DTYPES = ("float16", "float32")
ATTNPOOL_PARAMS = ("positional_embedding", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                   "v_proj.weight", "v_proj.bias", "c_proj.weight", "c_proj.bias")
BAD_IMAGE_COLUMNS = ("split", "path", "reason")

GROUP, DATASET, ATTRIBUTE = "group", "dataset", "attribute"

# ------------------------------------------------------------------------------------------------ #
# names
# ------------------------------------------------------------------------------------------------ #
ROOT = "/"
SPLITS_GROUP = "/splits"
FEWSHOT = "/fewshot"
CLASSNAMES = "/classnames"
TEXT = "/text"
TEMPLATES = "/text/templates"
EMBEDDINGS = "/text/embeddings"
CLASSIFIER = "/text/classifier"
MODEL = "/model"
LOGIT_SCALE = "/model/logit_scale"
ATTNPOOL = "/model/attnpool"
BAD_IMAGES = "/bad_images"

# datasets inside /splits/{split}
PATHS, LABELS, DENSE, POOLED, SOURCE_INDEX = "paths", "labels", "dense", "pooled", "source_index"

CHECKSUM = "sha256"  # attribute of every dataset
ATTRS_CHECKSUM = "attrs_sha256"  # root attribute: {"/path@name": sha256 of the value} of every other attribute


class Attr:
    """Root attribute names."""
    FORMAT = "format"
    SCHEMA_VERSION = "schema_version"
    CACHEKIT_VERSION = "cachekit_version"
    OPEN_CLIP_VERSION = "open_clip_version"
    TORCH_VERSION = "torch_version"
    H5PY_VERSION = "h5py_version"
    MODEL = "model"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_SHA256 = "checkpoint_sha256"
    WEIGHTS = "weights"
    RANDOM_WEIGHTS = "random_weights"
    INIT_SEED = "init_seed"
    IMAGE_SIZE = "image_size"
    PREPROCESS = "preprocess"
    AUGMENT = "augment"
    VIEWS = "views"
    SHOTS = "shots"
    SEEDS = "seeds"
    DENSE_DTYPE = "dense_dtype"
    DATASET_FINGERPRINT = "dataset_fingerprint"
    DATASET = "dataset"
    DATASET_FORMAT = "dataset_format"
    VAL_IS_TEST = "val_is_test"
    IDENTITY = "identity"
    CREATED = "created"
    EMBED_DIM = "embed_dim"
    DENSE_SHAPE = "dense_shape"
    ATTRS_SHA256 = ATTRS_CHECKSUM


class SplitAttr:
    VIEWS = "views"
    NUM_IMAGES = "num_images"


class FewshotAttr:
    K = "k"
    SEED = "seed"
    WITH_REPLACEMENT = "with_replacement"


class TextAttr:
    TEMPLATE_SET = "template_set"
    TRUNCATED_PROMPTS = "truncated_prompts"


class AttnpoolAttr:
    NUM_HEADS = "num_heads"


def split_path(split: str, name: str | None = None) -> str:
    return f"{SPLITS_GROUP}/{split}" + (f"/{name}" if name else "")


def fewshot_key(k: int, seed: int) -> str:
    return f"K{int(k)}_seed{int(seed)}"


_FEWSHOT_KEY = re.compile(r"K(\d+)_seed(-?\d+)$")


def parse_fewshot_key(name: str) -> tuple[int, int] | None:
    m = _FEWSHOT_KEY.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def fewshot_path(k: int, seed: int) -> str:
    return f"{FEWSHOT}/{fewshot_key(k, seed)}"


def attnpool_path(param: str) -> str:
    return f"{ATTNPOOL}/{param}"


def bad_images_path(column: str) -> str:
    return f"{BAD_IMAGES}/{column}"


def attr_key(obj: str, name: str) -> str:
    """Display key of an attribute: `/@views`, `/splits/val@num_images`."""
    return f"/@{name}" if obj == ROOT else f"{obj}@{name}"


# ------------------------------------------------------------------------------------------------ #
# the fields
# ------------------------------------------------------------------------------------------------ #
class Unknown(Exception):
    """A shape rule needs a dimension whose own source is damaged (and reported on its own)."""


class Dims:
    """The sizes shape rules refer to, read leniently from the file: C classes, D embed dim, V views,
    `dense` (Cd, H, W), N per split, T templates, B bad images, `dense_dtype`, `shots`, `seeds`."""

    def __init__(self, **values):
        self._v = values

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        v = self._v.get(name)
        if v is None:
            raise Unknown(name)
        return v

    def get(self, name, default=None):
        v = self._v.get(name)
        return default if v is None else v

    def n(self, split: str) -> int:
        v = (self._v.get("N") or {}).get(split)
        if v is None:
            raise Unknown(f"N[{split}]")
        return v


ShapeRule = Callable[[Dims, dict], tuple]
ValueRule = Callable[[Any, Dims, dict], "str | None"]


@dataclass(frozen=True)
class Field:
    """One schema entry.

    path: object path pattern (`/splits/{split}/dense`); for an attribute, the object it sits on.
    kind: group | dataset | attribute.  name: the attribute's name.
    dtype: datasets `float32`, `int64`, `str` (variable-length UTF-8) or `dense` (= `/@dense_dtype`);
    attributes `str`, `int` or `bool` (JSON attributes are `str` holding JSON of type `json`).
    json: for JSON attributes, `list[int]` or `object`.  shape: the rule, as documented.
    large: datasets too large to hash on every read (checked by a full `cachekit verify`).
    """

    path: str
    kind: str
    doc: str
    name: str | None = None
    dtype: str = ""
    json: str | None = None
    shape: str = ""
    large: bool = False
    rule: ShapeRule | None = None
    check_value: ValueRule | None = None

    @property
    def key(self) -> str:
        return attr_key(self.path, self.name) if self.kind == ATTRIBUTE else self.path

    @property
    def is_checksum(self) -> bool:
        return self.kind == ATTRIBUTE and self.name == CHECKSUM

    def type_label(self) -> str:
        if self.kind == GROUP:
            return ""
        if self.json:
            return f"JSON {self.json}"
        return {"str": "UTF-8 str" if self.kind == DATASET else "str",
                "dense": "float16/float32 (`/@dense_dtype`)"}.get(self.dtype, self.dtype)


def _positive(v, d, p):
    return None if v >= 1 else f"is {v}, must be >= 1"


def _nonneg(v, d, p):
    return None if v >= 0 else f"is {v}, must be >= 0"


def _equals(want):
    return lambda v, d, p: None if v == want else f"is {v!r}, must be {want!r}"


def _one_of(choices):
    return lambda v, d, p: None if v in choices else f"is {v!r}, must be one of {', '.join(choices)}"


def _int_list_rule(positive=False, length=None, nonempty=False):
    def rule(v, d, p):
        if nonempty and not v:
            return "is an empty list"
        if length is not None and len(v) != length:
            return f"has {len(v)} entries, must have {length}"
        if positive and any(x < 1 for x in v):
            return f"is {v}, entries must be >= 1"
        return None
    return rule


def _split_views(v, d, p):
    want = d.V + 1 if p["split"] == "train" else 1
    return None if v == want else f"is {v}, must be {want} ({'V+1' if p['split'] == 'train' else 'one view'})"


def _fewshot_attr(param):
    return lambda v, d, p: None if v == p[param] else f"is {v}, the dataset name says {p[param]}"


def _class_list(v, d, p):
    bad = [x for x in v if not 0 <= x < d.C]
    return f"holds {bad[:3]}, outside the classes 0..{d.C - 1}" if bad else None


def _attnpool_shape(d: Dims, p: dict) -> tuple:
    cd, h, w = d.dense
    return {"positional_embedding": (h * w + 1, cd), "c_proj.weight": (d.D, cd), "c_proj.bias": (d.D,)}.get(
        p["param"], (cd, cd) if p["param"].endswith("weight") else (cd,))


def _lead(d: Dims, split: str) -> tuple:
    return (d.V + 1, d.n("train")) if split == "train" else (d.n(split),)


def _grp(path, doc):
    return Field(path, GROUP, doc)


def _ds(path, dtype, shape, rule, doc, large=False):
    return Field(path, DATASET, doc, dtype=dtype, shape=shape, rule=rule, large=large)


def _attr(path, name, typ, doc, json=None, check=None):
    return Field(path, ATTRIBUTE, doc, name=name, dtype=typ, json=json, check_value=check)


_S = "/splits/{split}"
_FS = "/fewshot/K{K}_seed{seed}"

_BASE: tuple[Field, ...] = (
    _attr(ROOT, Attr.FORMAT, "str", f"always `{FORMAT}`", check=_equals(FORMAT)),
    _attr(ROOT, Attr.SCHEMA_VERSION, "int", f"`{SCHEMA_VERSION}`; readers refuse other versions",
          check=_equals(SCHEMA_VERSION)),
    _attr(ROOT, Attr.CACHEKIT_VERSION, "str", "version that wrote the file"),
    _attr(ROOT, Attr.OPEN_CLIP_VERSION, "str", "open_clip version used"),
    _attr(ROOT, Attr.TORCH_VERSION, "str", "torch version used"),
    _attr(ROOT, Attr.H5PY_VERSION, "str", "h5py version used"),
    _attr(ROOT, Attr.MODEL, "str", "open_clip model name, e.g. `RN50`"),
    _attr(ROOT, Attr.CHECKPOINT, "str", "checkpoint file name, or `random`"),
    _attr(ROOT, Attr.CHECKPOINT_SHA256, "str", "sha256 of the checkpoint file, or `random`"),
    _attr(ROOT, Attr.WEIGHTS, "str", 'human-readable: "random weights (seed S), not pretrained ..." or the checkpoint'),
    _attr(ROOT, Attr.RANDOM_WEIGHTS, "bool", "true when no checkpoint was given"),
    _attr(ROOT, Attr.INIT_SEED, "int", "seed of the random initialisation"),
    _attr(ROOT, Attr.IMAGE_SIZE, "int", "input resolution", check=_positive),
    _attr(ROOT, Attr.PREPROCESS, "str", "open_clip's preprocess config (size, mean, std, interpolation, resize mode)",
          json="object"),
    _attr(ROOT, Attr.AUGMENT, "str", "augmentation of the train views: RandomResizedCrop scale/ratio, flip "
          "probability, seed, views", json="object"),
    _attr(ROOT, Attr.VIEWS, "int", "V, augmented views per train image (view 0, the plain view, comes on top)",
          check=_nonneg),
    _attr(ROOT, Attr.SHOTS, "str", "list of K", json="list[int]", check=_int_list_rule(positive=True, nonempty=True)),
    _attr(ROOT, Attr.SEEDS, "str", "list of few-shot seeds", json="list[int]", check=_int_list_rule(nonempty=True)),
    _attr(ROOT, Attr.DENSE_DTYPE, "str", "`float16` (default) or `float32`", check=_one_of(DENSE_DTYPES)),
    _attr(ROOT, Attr.DATASET_FINGERPRINT, "str", "sha256 over (split, path, label, file size) of every image, "
          "and the class names"),
    _attr(ROOT, Attr.DATASET, "str", "dataset summary: format, counts per split and class, where val/test came "
          "from, split seed", json="object"),
    _attr(ROOT, Attr.DATASET_FORMAT, "str", "`imagefolder`, `coop` or `manifest`"),
    _attr(ROOT, Attr.VAL_IS_TEST, "bool", "true when test is the val data (then `/splits/test` is a hard link to "
          "`/splits/val`)"),
    _attr(ROOT, Attr.IDENTITY, "str", "everything that determines the contents; a rerun must match it to resume "
          "or reuse", json="object"),
    _attr(ROOT, Attr.CREATED, "str", "UTC creation time, ISO 8601"),
    _attr(ROOT, Attr.EMBED_DIM, "int", "D", check=_positive),
    _attr(ROOT, Attr.DENSE_SHAPE, "str", "[Cd, H, W]", json="list[int]",
          check=_int_list_rule(positive=True, length=3)),
    _attr(ROOT, Attr.ATTRS_SHA256, "str", "sha256 of every other attribute's value, by `path@name`; written "
          "last, so an edited attribute is found and named", json="object"),
    _ds(CLASSNAMES, "str", "(C,)", lambda d, p: (None,), "class names, index = label"),
    _grp(SPLITS_GROUP, "one group per split"),
    _grp(_S, "`{split}` is `train`, `val` or `test`"),
    _attr(_S, SplitAttr.VIEWS, "int", "V+1 for train, 1 otherwise", check=_split_views),
    _attr(_S, SplitAttr.NUM_IMAGES, "int", "N", check=_nonneg),
    _ds(f"{_S}/{PATHS}", "str", "(N,)", lambda d, p: (d.n(p["split"]),), "image paths relative to the image root"),
    _ds(f"{_S}/{LABELS}", "int64", "(N,)", lambda d, p: (d.n(p["split"]),), "labels 0..C−1"),
    _ds(f"{_S}/{DENSE}", "dense", "train (V+1, N, Cd, H, W); else (N, Cd, H, W)",
        lambda d, p: _lead(d, p["split"]) + tuple(d.dense),
        "the map entering `visual.attnpool`; chunked one image per chunk, uncompressed", large=True),
    _ds(f"{_S}/{POOLED}", "float32", "train (V+1, N, D); else (N, D)", lambda d, p: _lead(d, p["split"]) + (d.D,),
        "`visual.attnpool(dense)` = `encode_image`, not normalised", large=True),
    _ds(split_path("train", SOURCE_INDEX), "int64", "(N,)", lambda d, p: (d.n("train"),),
        "position of each encoded train image in the dataset's full train list"),
    _grp(FEWSHOT, "one dataset per (K, seed) of `/@shots` × `/@seeds`"),
    _ds(_FS, "int64", "(C·K,)", lambda d, p: (d.C * p["K"],),
        "rows of `/splits/train`, class-grouped, K per class (repeats when sampled with replacement)"),
    _attr(_FS, FewshotAttr.K, "int", "K", check=_fewshot_attr("K")),
    _attr(_FS, FewshotAttr.SEED, "int", "seed", check=_fewshot_attr("seed")),
    _attr(_FS, FewshotAttr.WITH_REPLACEMENT, "str", "classes with fewer than K images, sampled with replacement",
          json="list[int]", check=_class_list),
    _grp(TEXT, "text side"),
    _attr(TEXT, TextAttr.TEMPLATE_SET, "str", "template set name or file"),
    _attr(TEXT, TextAttr.TRUNCATED_PROMPTS, "int", "prompts the tokenizer truncated at 77 tokens", check=_nonneg),
    _ds(TEMPLATES, "str", "(T,)", lambda d, p: (None,), "prompt templates, each with one `{}`"),
    _ds(EMBEDDINGS, "float32", "(T, C, D)", lambda d, p: (d.T, d.C, d.D),
        "text embedding per template and class, L2-normalised"),
    _ds(CLASSIFIER, "float32", "(C, D)", lambda d, p: (d.C, d.D),
        "mean over templates, L2-normalised: the zero-shot classifier W"),
    _grp(MODEL, "model parts the methods need"),
    _ds(LOGIT_SCALE, "float32", "()", lambda d, p: (),
        "the model's learned `logit_scale.exp()` (methods use the fixed 100)"),
    _grp(ATTNPOOL, "the attention-pooling layer, open_clip parameter names"),
    _attr(ATTNPOOL, AttnpoolAttr.NUM_HEADS, "int", "heads (RN50: 32)", check=_positive),
    _ds(ATTNPOOL + "/{param}", "float32", "see meaning", _attnpool_shape,
        "`positional_embedding` (HW+1, Cd); `q_proj.weight`, `k_proj.weight`, `v_proj.weight` (Cd, Cd); "
        "`q_proj.bias`, `k_proj.bias`, `v_proj.bias` (Cd,); `c_proj.weight` (D, Cd); `c_proj.bias` (D,)"),
    _grp(BAD_IMAGES, "unreadable images skipped with `--skip-bad` (empty otherwise)"),
    _ds(bad_images_path("split"), "str", "(B,)", lambda d, p: (None,), "split of each skipped image"),
    _ds(bad_images_path("path"), "str", "(B,)", lambda d, p: (d.B,), "its path"),
    _ds(bad_images_path("reason"), "str", "(B,)", lambda d, p: (d.B,), "the decoder's one-line reason"),
)


def _with_checksums(fields) -> tuple[Field, ...]:
    out = []
    for f in fields:
        out.append(f)
        if f.kind == DATASET:
            out.append(_attr(f.path, CHECKSUM, "str", "sha256 of the dataset: dtype, shape and contents "
                             "(strings canonical); see `cachekit.schema.Checksum`"))
    return tuple(out)


FIELDS: tuple[Field, ...] = _with_checksums(_BASE)
"""Every group, dataset and attribute of a cache, in document order."""

PLACEHOLDERS = {"{split}": "(?P<split>train|val|test)", "{K}": r"(?P<K>\d+)", "{seed}": r"(?P<seed>-?\d+)",
                "{param}": r"(?P<param>[a-z_]+(\.[a-z]+)?)"}


def field(key: str) -> Field:
    """The field of a display key (`/splits/{split}/labels`, `/@views`)."""
    for f in FIELDS:
        if f.key == key:
            return f
    raise KeyError(key)


@functools.lru_cache(maxsize=None)
def pattern_regex(pattern: str) -> re.Pattern:
    rx = re.escape(pattern)
    for k, v in PLACEHOLDERS.items():
        rx = rx.replace(re.escape(k), v)
    return re.compile(rx + "$")


@functools.lru_cache(maxsize=4096)
def _match(key: str):
    for f in FIELDS:
        m = pattern_regex(f.key).match(key)
        if m:
            return f, tuple((k, int(v) if k in ("K", "seed") else v) for k, v in m.groupdict().items()
                            if v is not None and k in ("split", "K", "seed", "param"))
    return None


def match(key: str) -> tuple[Field, dict] | None:
    """The field a concrete key (`/fewshot/K2_seed1@k`) belongs to, and its placeholder values."""
    m = _match(key)
    return None if m is None else (m[0], dict(m[1]))


# ------------------------------------------------------------------------------------------------ #
# values
# ------------------------------------------------------------------------------------------------ #
def is_string_dtype(dt) -> bool:
    return np.dtype(dt).kind in "OSU"


def string_dtype():
    return h5py.string_dtype()


def strings(data) -> list[str]:
    """Decoded Python strings of a string dataset's values (or of the dataset itself)."""
    if isinstance(data, h5py.Dataset):
        data = data[()]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(data, dtype=object).ravel()]


def _dtype_label(dt) -> str:
    info = h5py.check_string_dtype(dt)
    if info is not None:
        return f"{'variable-length' if info.length is None else f'fixed-length ({info.length})'} " \
               f"{info.encoding} str"
    return str(dt)


def _type_label(v) -> str:
    if isinstance(v, np.ndarray):
        return f"array {v.dtype}{list(v.shape)}"
    if isinstance(v, (np.bool_, bool)):
        return "bool"
    if isinstance(v, (np.integer, int)):
        return "int"
    if isinstance(v, (np.floating, float)):
        return "float"
    return type(v).__name__


def _short(v, n=40) -> str:
    s = repr(v.item() if isinstance(v, np.generic) else v)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


class FieldError(ValueError):
    """An attribute that is missing, of the wrong type, not JSON or of a wrong value."""

    def __init__(self, key: str, what: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.what, self.message = key, what, message


def decode_attr(f: Field, raw, key: str | None = None, dims: Dims | None = None, params: dict | None = None):
    """The Python value of attribute `f` from its raw h5py value: type-checked, JSON decoded, value rule
    applied when `dims` are given. Raises FieldError naming the field."""
    key = key or f.key
    if f.dtype == "str":
        ok = isinstance(raw, str)
    elif f.dtype == "int":
        ok = isinstance(raw, (np.integer, int)) and not isinstance(raw, (np.bool_, bool))
    elif f.dtype == "bool":
        ok = isinstance(raw, (np.bool_, bool))
    else:
        raise AssertionError(f.dtype)
    if not ok:
        raise FieldError(key, "type", f"is {_type_label(raw)} {_short(raw)}, must be {f.type_label()}")
    v = raw.item() if isinstance(raw, np.generic) else raw
    if f.json:
        try:
            v = json.loads(v)
        except ValueError as exc:
            raise FieldError(key, "json", f"is not valid JSON ({getattr(exc, 'msg', exc)}): {_short(raw)}") from None
        if f.json == "object" and not isinstance(v, dict):
            raise FieldError(key, "json", f"holds JSON {type(v).__name__} {_short(v)}, must be a JSON object")
        if f.json == "list[int]" and not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in v)):
            raise FieldError(key, "json", f"holds JSON {_short(v)}, must be a list of integers")
    if dims is not None and f.check_value is not None:
        try:
            msg = f.check_value(v, dims, params or {})
        except Unknown:
            msg = None
        if msg:
            raise FieldError(key, "value", msg)
    return v


def encode_attr(f: Field, value):
    """The value to store for attribute `f` (JSON text for JSON fields)."""
    if f.json:
        return json.dumps(value, sort_keys=True)
    if f.dtype == "bool":
        return bool(value)
    if f.dtype == "int":
        return int(value)
    return str(value)


def _attr_field(obj_path: str, name: str) -> tuple[Field, dict]:
    m = match(attr_key(obj_path, name))
    if m is None or m[0].kind != ATTRIBUTE:
        raise KeyError(f"attribute {attr_key(obj_path, name)} is not in cachekit.schema")
    return m


def set_attrs(obj, values: dict) -> None:
    """Write attributes of `obj` (a group or dataset), each encoded as its field says; an attribute the
    schema does not declare is a programming error (KeyError)."""
    for name, value in values.items():
        f, _ = _attr_field(obj.name, name)
        obj.attrs[name] = encode_attr(f, value)


def read_attr(obj, name: str):
    """Decoded value of a declared attribute of `obj`; FieldError (naming it) if missing or malformed."""
    f, _ = _attr_field(obj.name, name)
    key = attr_key(obj.name, name)
    if name not in obj.attrs:
        raise FieldError(key, "missing", "is missing")
    return decode_attr(f, obj.attrs[name], key)


def read_attrs(obj, lenient: bool = False) -> dict:
    """Every attribute of `obj`, decoded (JSON fields parsed). `lenient`: a malformed declared attribute
    keeps its raw value instead of raising FieldError. Undeclared attributes come back as they are."""
    out = {}
    for name, raw in obj.attrs.items():
        try:
            out[name] = decode_attr(_attr_field(obj.name, name)[0], raw, attr_key(obj.name, name))
            continue
        except KeyError:
            pass
        except FieldError:
            if not lenient:
                raise
        v = raw.decode() if isinstance(raw, bytes) else raw
        out[name] = v.item() if isinstance(v, np.generic) else v
    return out


# ------------------------------------------------------------------------------------------------ #
# checksums
# ------------------------------------------------------------------------------------------------ #
class Checksum:
    """sha256 of a dataset: a header with the dtype and shape, then the contents in C order, fed in
    blocks (any cut in C order gives the same digest). Numbers as little-endian bytes of the stored dtype;
    strings (however stored) as UTF-8, each preceded by its length (8 bytes, little-endian)."""

    VERSION = "cachekit-sha256/1"

    def __init__(self, dtype, shape):
        self.string = is_string_dtype(dtype)
        self.dtype = None if self.string else np.dtype(dtype).newbyteorder("<")
        head = f"{self.VERSION} {'str' if self.string else self.dtype.str} {[int(s) for s in shape]}\n"
        self.h = hashlib.sha256(head.encode())

    def update(self, block) -> None:
        if self.string:
            for x in np.asarray(block, dtype=object).ravel():
                b = x if isinstance(x, bytes) else str(x).encode("utf-8")
                self.h.update(len(b).to_bytes(8, "little"))
                self.h.update(b)
        else:
            self.h.update(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def array_checksum(data, dtype=None) -> str:
    a = np.asarray(data, dtype=object) if dtype is not None and is_string_dtype(dtype) else np.asarray(data)
    c = Checksum(dtype if dtype is not None else a.dtype, a.shape)
    c.update(a)
    return c.hexdigest()


def iter_blocks(ds: h5py.Dataset, block_bytes: int = 8 << 20) -> Iterator[np.ndarray]:
    """A dataset's contents in C order, as blocks of at most `block_bytes` (at least one element). The cut
    descends through leading axes, so a (V, N, C, H, W) train map is read a few maps at a time, never one whole
    view (which is gigabytes at ImageNet size)."""
    if ds.ndim == 0 or 0 in ds.shape:
        yield np.asarray(ds[()])
        return
    shape, item = ds.shape, ds.dtype.itemsize
    # The first axis d whose rows (everything after it) fit in a block; the axes before it are walked one index
    # at a time, axis d in steps of as many rows as fit.
    d = 0
    while d < ds.ndim - 1 and item * int(np.prod(shape[d + 1:])) > block_bytes:
        d += 1
    row = max(1, item * int(np.prod(shape[d + 1:])))
    step = max(1, block_bytes // row)
    for prefix in np.ndindex(*shape[:d]):
        for i in range(0, shape[d], step):
            yield ds[prefix + (slice(i, i + step),)]


def dataset_checksum(ds: h5py.Dataset) -> str:
    c = Checksum(ds.dtype, ds.shape)
    for b in iter_blocks(ds):
        c.update(b)
    return c.hexdigest()


def write_dataset(parent, name: str, data, dtype=None, **kw) -> h5py.Dataset:
    """Create a declared dataset from in-memory data, with its checksum. A list of str is stored as
    variable-length UTF-8 strings."""
    if dtype is None and isinstance(data, (list, tuple)) and all(isinstance(x, str) for x in data):
        dtype = string_dtype()
    if dtype is not None and is_string_dtype(dtype):
        data = np.asarray(list(data), dtype=object)
        ds = parent.create_dataset(name, data=data, dtype=string_dtype(), **kw)
    else:
        ds = parent.create_dataset(name, data=data, dtype=dtype, **kw)
    if match(ds.name) is None or match(ds.name)[0].kind != DATASET:
        raise KeyError(f"dataset {ds.name} is not in cachekit.schema")
    ds.attrs[CHECKSUM] = array_checksum(data, ds.dtype)
    return ds


def attr_digest(raw) -> str:
    """sha256 of one attribute value as stored (its type and value)."""
    if isinstance(raw, np.ndarray):
        v = ["array", raw.dtype.str, list(raw.shape), strings(raw) if raw.dtype.kind in "OSU" else raw.tolist()]
    elif isinstance(raw, bytes):
        v = ["bytes", raw.hex()]
    elif isinstance(raw, (np.bool_, bool)):
        v = ["bool", bool(raw)]
    elif isinstance(raw, (np.integer, int)):
        v = ["int", int(raw)]
    elif isinstance(raw, (np.floating, float)):
        v = ["float", repr(float(raw))]
    else:
        v = [type(raw).__name__, str(raw)]
    return hashlib.sha256(json.dumps(v).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ #
# a file against the schema
# ------------------------------------------------------------------------------------------------ #
@dataclass(frozen=True)
class Instance:
    field: Field
    path: str  # concrete object path (for an attribute: the object it sits on)
    params: dict

    @property
    def key(self) -> str:
        return attr_key(self.path, self.field.name) if self.field.kind == ATTRIBUTE else self.path


@dataclass(frozen=True)
class Problem:
    key: str  # concrete key: `/splits/val/labels`, `/@views`
    what: str  # missing | kind | dtype | shape | type | json | value | changed | unexpected
    message: str
    kind: str  # group | dataset | attribute

    def __str__(self):
        return f"{self.key}: {self.message}"


def _get(f, path: str):
    try:
        return f.get(path)
    except (KeyError, ValueError, RuntimeError, OSError):
        return None


def _walk(g: h5py.Group, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    if depth > 8:
        return
    for name in g.keys():
        obj = _get(g, name)
        path = f"{prefix}/{name}"
        yield path, obj
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, path, depth + 1)


class _Unreadable:
    def __init__(self, reason: str):
        self.reason = reason


class View:
    """One pass over a file: every object by path (a hard-linked one under each of its paths), each
    object's attributes read once. `check`, `instances` and `dims_of` take a View or a file."""

    def __init__(self, f: h5py.File):
        self.f = f
        self.objs = {ROOT: f, **dict(_walk(f))}
        self._attrs: dict[str, dict] = {}

    def get(self, path: str):
        return self.objs.get(path)

    def attrs(self, path: str) -> dict:
        if path not in self._attrs:
            obj, d = self.objs.get(path), {}
            if obj is not None:
                try:
                    d = dict(obj.attrs.items())  # several times faster than one by one
                except Exception:
                    for name in obj.attrs.keys():
                        try:
                            d[name] = obj.attrs[name]
                        except Exception as exc:  # an attribute h5py cannot decode
                            d[name] = _Unreadable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._attrs[path] = d
        return self._attrs[path]


def _as_view(f) -> View:
    return f if isinstance(f, View) else View(f)


def _lenient_attr(v: View, path: str, name: str):
    raw = v.attrs(path).get(name)
    if raw is None or isinstance(raw, _Unreadable):
        return None
    try:
        return decode_attr(_attr_field(path, name)[0], raw)
    except (FieldError, KeyError):
        return None


def dims_of(f) -> Dims:
    v = _as_view(f)

    def first_dim(path):
        ds = v.get(path)
        return int(ds.shape[0]) if isinstance(ds, h5py.Dataset) and ds.ndim == 1 else None

    dense = _lenient_attr(v, ROOT, Attr.DENSE_SHAPE)
    dense = tuple(dense) if isinstance(dense, list) and len(dense) == 3 and all(x >= 1 for x in dense) else None
    views = _lenient_attr(v, ROOT, Attr.VIEWS)
    n = {}
    for s in SPLITS:
        x = _lenient_attr(v, split_path(s), SplitAttr.NUM_IMAGES)
        n[s] = x if x is not None and x >= 0 else None
    dd = _lenient_attr(v, ROOT, Attr.DENSE_DTYPE)
    return Dims(C=first_dim(CLASSNAMES), D=_lenient_attr(v, ROOT, Attr.EMBED_DIM),
                V=views if views is not None and views >= 0 else None, dense=dense, N=n,
                T=first_dim(TEMPLATES), B=first_dim(bad_images_path("split")),
                dense_dtype=dd if dd in DENSE_DTYPES else None,
                shots=_lenient_attr(v, ROOT, Attr.SHOTS), seeds=_lenient_attr(v, ROOT, Attr.SEEDS))


def _expand(pattern: str, v: View, dims: Dims) -> list[tuple[str, dict]]:
    out = [(pattern, {})]
    if "{split}" in pattern:
        out = [(p.replace("{split}", s), {**q, "split": s}) for p, q in out for s in SPLITS]
    if "{K}" in pattern:
        sets = set()
        shots, seeds = dims.get("shots"), dims.get("seeds")
        if shots and seeds:
            sets |= {(k, s) for k in shots for s in seeds}
        g = v.get(FEWSHOT)
        if isinstance(g, h5py.Group):
            sets |= {ks for ks in map(parse_fewshot_key, g.keys()) if ks is not None}
        out = [(p.replace("K{K}_seed{seed}", fewshot_key(k, s)), {**q, "K": k, "seed": s})
               for p, q in out for k, s in sorted(sets)]
    if "{param}" in pattern:
        out = [(p.replace("{param}", a), {**q, "param": a}) for p, q in out for a in ATTNPOOL_PARAMS]
    return out


def instances(f, dims: Dims | None = None) -> list[Instance]:
    """Every concrete group, dataset and attribute the schema expects in `f` (few-shot sets: those of
    `/@shots` × `/@seeds` and any other present)."""
    v = _as_view(f)
    dims = dims or dims_of(v)
    return [Instance(fld, path, params) for fld in FIELDS for path, params in _expand(fld.path, v, dims)]


def check(f, extras: bool = True, attr_checksums: bool = True) -> tuple[list[Problem], Dims]:
    """Compare `f` with the schema without reading any array: every expected object present and of its
    kind, dtype and shape; every attribute present, of its type, valid JSON and a valid value; every
    attribute equal to what `/@attrs_sha256` recorded; with `extras`, nothing undeclared."""
    v = _as_view(f)
    dims = dims_of(v)
    probs: list[Problem] = []
    missing_objs: set[str] = set()
    insts = instances(v, dims)
    attr_values: dict[str, Any] = {}

    def under_missing(path):
        return any(path == m or path.startswith(m + "/") for m in missing_objs)

    for it in insts:
        fld = it.field
        if under_missing(it.path):
            continue  # its group or dataset is reported
        obj = v.get(it.path)
        if fld.kind in (GROUP, DATASET):
            if obj is None:
                missing_objs.add(it.path)
                probs.append(Problem(it.key, "missing", f"{fld.kind} is missing", fld.kind))
                continue
            want = h5py.Group if fld.kind == GROUP else h5py.Dataset
            if not isinstance(obj, want):
                missing_objs.add(it.path)
                probs.append(Problem(it.key, "kind", f"is a {'group' if isinstance(obj, h5py.Group) else 'dataset'}"
                                     f", must be a {fld.kind}", fld.kind))
                continue
            if fld.kind == DATASET:
                probs += _dataset_problems(obj, fld, it, dims)
            continue
        if obj is None:
            continue
        attrs = v.attrs(it.path)
        if fld.name not in attrs:
            probs.append(Problem(it.key, "missing", "attribute is missing", ATTRIBUTE))
            continue
        raw = attrs[fld.name]
        if isinstance(raw, _Unreadable):
            probs.append(Problem(it.key, "type", f"cannot be read ({raw.reason})", ATTRIBUTE))
            continue
        try:
            decode_attr(fld, raw, it.key, dims, it.params)
        except FieldError as exc:
            probs.append(Problem(it.key, exc.what, exc.message, ATTRIBUTE))
            continue
        attr_values[it.key] = raw

    if attr_checksums:
        probs += _attr_checksum_problems(v, insts, attr_values, {p.key for p in probs})
    if extras:
        probs += _extras(v, insts)
    return probs, dims


def _dataset_problems(ds: h5py.Dataset, fld: Field, it: Instance, dims: Dims) -> list[Problem]:
    out = []
    dt = ds.dtype
    if fld.dtype == "str":
        info = h5py.check_string_dtype(dt)
        ok = info is not None and info.length is None and info.encoding == "utf-8"
        want = "variable-length UTF-8 str"
    elif fld.dtype == "dense":
        want_dt = dims.get("dense_dtype")
        ok = str(dt) == want_dt if want_dt else str(dt) in DENSE_DTYPES
        want = want_dt or " or ".join(DENSE_DTYPES)
    else:
        ok = dt == np.dtype(fld.dtype)
        want = fld.dtype
    if not ok:
        out.append(Problem(it.key, "dtype", f"dtype is {_dtype_label(dt)}, must be {want}", DATASET))
    try:
        shape = fld.rule(dims, it.params) if fld.rule else None
    except Unknown:
        shape = None
    if shape is not None:
        have = tuple(ds.shape)
        if len(have) != len(shape) or any(w is not None and w != h for w, h in zip(shape, have)):
            want_s = "(" + ", ".join("n" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
            out.append(Problem(it.key, "shape", f"shape is {have}, must be {want_s} ({fld.shape})", DATASET))
    return out


def _recorded(v: View) -> dict | None:
    raw = v.attrs(ROOT).get(ATTRS_CHECKSUM)
    try:
        v = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def _attr_checksum_problems(v: View, insts, values: dict, reported: set) -> list[Problem]:
    rec = _recorded(v)
    if rec is None:
        return []  # /@attrs_sha256 itself is reported (missing, or not a JSON object)
    out = []
    for it in insts:
        fld = it.field
        if fld.kind != ATTRIBUTE or fld.is_checksum or fld.name == ATTRS_CHECKSUM and it.path == ROOT:
            continue
        if it.key not in values or it.key in reported:
            continue
        digest = attr_digest(values[it.key])
        if it.key not in rec:
            out.append(Problem(it.key, "changed", f"is not recorded in /@{ATTRS_CHECKSUM} (added after writing)",
                               ATTRIBUTE))
        elif rec[it.key] != digest:
            out.append(Problem(it.key, "changed", f"value {_short(values[it.key])} differs from the one recorded in "
                               f"/@{ATTRS_CHECKSUM} at write time (changed after writing)", ATTRIBUTE))
    expected = {it.key for it in insts if it.field.kind == ATTRIBUTE}
    for key in sorted(set(rec) - expected):
        out.append(Problem(f"/@{ATTRS_CHECKSUM}", "value", f"records {key}, which the cache does not have",
                           ATTRIBUTE))
    return out


def _extras(v: View, insts: list[Instance]) -> list[Problem]:
    objs = {it.path for it in insts if it.field.kind != ATTRIBUTE}
    attrs = {it.key for it in insts if it.field.kind == ATTRIBUTE}
    out, undeclared = [], []
    for path, obj in v.objs.items():
        if path != ROOT and path not in objs:
            if not any(path.startswith(u + "/") for u in undeclared):  # its parent is reported already
                undeclared.append(path)
                kind = DATASET if isinstance(obj, h5py.Dataset) else GROUP
                out.append(Problem(path, "unexpected", f"{kind} is not in the cache schema", kind))
            continue
        if obj is None:
            continue
        for name in v.attrs(path):
            key = attr_key(path, name)
            if key not in attrs:
                out.append(Problem(key, "unexpected", "attribute is not in the cache schema", ATTRIBUTE))
    return out


def seal(f: h5py.File) -> None:
    """Record the sha256 of every attribute's value in `/@attrs_sha256`; the writer's last step."""
    rec, v = {}, View(f)
    for it in instances(v):
        fld = it.field
        if fld.kind != ATTRIBUTE or fld.is_checksum or (it.path == ROOT and fld.name == ATTRS_CHECKSUM):
            continue
        attrs = v.attrs(it.path)
        if fld.name in attrs:
            rec[it.key] = attr_digest(attrs[fld.name])
    f.attrs[ATTRS_CHECKSUM] = json.dumps(rec, sort_keys=True)


# ------------------------------------------------------------------------------------------------ #
# documentation
# ------------------------------------------------------------------------------------------------ #
DOC_BEGIN = "<!-- schema table: generated by `python -m cachekit.schema --docs docs/cache-format.md` -->"
DOC_END = "<!-- end of schema table -->"


def markdown_table() -> str:
    """The layout table of docs/cache-format.md."""
    rows = ["| path | kind | shape | dtype | meaning |", "|---|---|---|---|---|"]
    for fld in FIELDS:
        rows.append(f"| `{fld.key}` | {fld.kind} | {fld.shape} | {fld.type_label()} | {fld.doc} |")
    return "\n".join(rows)


def docs_section(text: str) -> str:
    """The generated part of a document (between DOC_BEGIN and DOC_END)."""
    a, b = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    return text[a:b].strip("\n")


def rewrite_docs(text: str) -> str:
    a, b = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    return text[:a] + "\n" + markdown_table() + "\n" + text[b:]


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m cachekit.schema", description=__doc__.splitlines()[0])
    ap.add_argument("--docs", help="rewrite the layout table of this Markdown file in place")
    a = ap.parse_args(argv)
    if a.docs:
        p = Path(a.docs)
        p.write_text(rewrite_docs(p.read_text()))
    else:
        sys.stdout.write(markdown_table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
