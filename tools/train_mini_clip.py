"""Train the cachekit mini-CLIP on Open Clip Art (Debian's ``openclipart-png``), on the CPU.

The model is open_clip's ``CLIP`` with a ``ModifiedResNet`` image tower (so ``visual.attnpool`` and the
dense map entering it exist exactly as in RN50) and a small text transformer; its architecture is the
registered cachekit config ``cachekit/model_configs/mini-clip.json``. Training is the standard
symmetric contrastive (InfoNCE) loss with a learnable logit scale, on captions made from each
drawing's title (its file name) and the words of its category folder. See ``docs/mini-clip.md``.

Every image of the demo / evaluation set (``cachekit/demo_data/openclipart/SOURCES.tsv``, written by
``tools/build_demo_data.py``) is held out: a source file is left out of pretraining when its path, its
content (sha256), its drawing family (``family_key``: numbered and recoloured variants) or its look
(grey-level / edge thumbnails under any rotation or mirror, ``near_duplicate``) matches a held-out one.

Usage (from the repository root; ``make mini-clip`` runs the first line)::

    .venv/bin/python tools/train_mini_clip.py train                 # writes the checkpoint and the log
    .venv/bin/python tools/train_mini_clip.py eval cachekit/weights/mini-clip-openclipart.pt

``train`` is seeded and deterministic on the CPU with ``--threads 1`` (the default): the same torch
version on the same kind of CPU gives the same tensors, and the same file byte for byte when written
to the same ``--out`` name (``torch.save`` stores the file name inside the archive). Decoded source
images are cached under ``--work-dir`` (default ``cache/mini-clip``), so a second run skips the
decoding. About 15 minutes on an idle 2-core machine, one thread (docs/mini-clip.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_demo_data as bdd  # noqa: E402  (the sibling script: convert, family_key, near-duplicate keys)

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "mini-clip"
DESCRIPTION = "cachekit mini-CLIP trained on Open Clip Art"
DEFAULT_SOURCE = Path("/usr/share/openclipart/png")
DEFAULT_HELDOUT = REPO / "cachekit" / "demo_data" / "openclipart" / "SOURCES.tsv"
DEFAULT_OUT = REPO / "cachekit" / "weights" / "mini-clip-openclipart.pt"
DEFAULT_WORK = REPO / "cache" / "mini-clip"
STORE_SIDE = 112  # training images are kept as 112x112 centre squares, random-cropped to the model's 96
PREPROCESS_VERSION = 1  # bump when the decoding below changes (invalidates the work-dir cache)

# ----------------------------------------------------------------------------------------------- #
# captions
# ----------------------------------------------------------------------------------------------- #
# Category folder -> (noun phrase, broader noun phrase or None). A folder not listed takes the entry
# of its nearest listed ancestor, and the folder names below that ancestor become title words
# (signs_and_symbols/flags/europe/france -> "flag", title words "europe france"). None: no category.
CATEGORIES: dict[str, tuple[str | None, str | None]] = {
    "animals": ("animal", None),
    "animals/amphibian": ("amphibian", "animal"),
    "animals/birds": ("bird", "animal"),
    "animals/birds/penguin": ("penguin", "bird"),
    "animals/bugs": ("insect", "animal"),
    "animals/dinosaurs": ("dinosaur", "animal"),
    "animals/fantasy": ("fantasy creature", "animal"),
    "animals/fish": ("fish", "animal"),
    "animals/mammals": ("mammal", "animal"),
    "animals/mammals/bears": ("bear", "mammal"),
    "animals/mammals/big_cats": ("big cat", "mammal"),
    "animals/mammals/dogs": ("dog", "mammal"),
    "animals/mammals/horses": ("horse", "mammal"),
    "animals/mammals/housecats": ("cat", "mammal"),
    "buildings": ("building", None),
    "buildings/furniture": ("piece of furniture", None),
    "buildings/homes": ("house", "building"),
    "buttons": ("button", None),
    "computer": ("computer picture", None),
    "computer/buttons": ("button", None),
    "computer/connectors": ("connector", "computer picture"),
    "computer/diagrams": ("diagram", "computer picture"),
    "computer/folders": ("folder icon", "computer icon"),
    "computer/games": ("computer game", None),
    "computer/hardware": ("computer hardware", "computer picture"),
    "computer/icons": ("computer icon", None),
    "computer/network": ("network diagram", "computer picture"),
    "containers": ("container", None),
    "decorations": ("decoration", None),
    "education": ("school item", None),
    "education/books": ("book", None),
    "electronics": ("electronic device", None),
    "electronics/battery": ("battery", "electronic device"),
    "electronics/bulb": ("light bulb", None),
    "food": ("food", None),
    "food/beverages": ("drink", "food"),
    "food/beverages/alcohol": ("alcoholic drink", "drink"),
    "food/breads_and_carbs": ("bread", "food"),
    "food/dairy": ("dairy product", "food"),
    "food/desserts": ("dessert", "food"),
    "food/fruit": ("fruit", "food"),
    "food/meats_and_eggs": ("meat", "food"),
    "food/vegetables": ("vegetable", "food"),
    "geography": ("map", None),
    "geography/astronomy": ("astronomy picture", None),
    "logos": ("logo", None),
    "office": ("office item", None),
    "office/telephone": ("telephone", None),
    "people": ("person", None),
    "people/bodypart": ("body part", "person"),
    "people/clothing": ("piece of clothing", None),
    "people/clothing/hats": ("hat", "piece of clothing"),
    "people/clothing/jewelry": ("piece of jewelry", None),
    "people/clothing/pantyhose": ("pantyhose", "piece of clothing"),
    "people/smilies": ("smiley face", None),
    "people/stickmen": ("stick figure", "person"),
    "plants": ("plant", None),
    "plants/flowers": ("flower", "plant"),
    "plants/trees": ("tree", "plant"),
    "plants/trees/evergreen": ("evergreen tree", "tree"),
    "recreation": ("leisure picture", None),
    "recreation/art": ("art supply", None),
    "recreation/games": ("game", None),
    "recreation/games/cards": ("playing card", "game"),
    "recreation/games/chess": ("chess piece", "game"),
    "recreation/games/dice": ("die", "game"),
    "recreation/holiday": ("holiday picture", None),
    "recreation/music": ("music picture", None),
    "recreation/music/CD_Player": ("cd player", None),
    "recreation/party": ("party decoration", None),
    "recreation/religion": ("religious symbol", None),
    "recreation/sports": ("sports picture", None),
    "recreation/toys": ("toy", None),
    "science": ("science picture", None),
    "science/medicine": ("medicine", None),
    "shapes": ("shape", None),
    "shapes/arrows": ("arrow", "shape"),
    "shapes/callouts": ("speech bubble", "shape"),
    "shapes/flowchart": ("flowchart symbol", "shape"),
    "shapes/jigsaw": ("jigsaw puzzle piece", "shape"),
    "shapes/stars": ("star", "shape"),
    "signs_and_symbols": ("symbol", None),
    "signs_and_symbols/awards": ("award", None),
    "signs_and_symbols/clocks": ("clock", None),
    "signs_and_symbols/disability": ("disability symbol", "symbol"),
    "signs_and_symbols/flags": ("flag", None),
    "signs_and_symbols/flags/semaphore": ("semaphore signal", None),
    "signs_and_symbols/hazard": ("hazard sign", "symbol"),
    "signs_and_symbols/led": ("led digit", None),
    "signs_and_symbols/map_symbols": ("map symbol", "symbol"),
    "signs_and_symbols/money": ("money symbol", "symbol"),
    "signs_and_symbols/weather": ("weather symbol", "symbol"),
    "special": ("graphic", None),
    "special/gradients": ("gradient", None),
    "special/patterns": ("pattern", None),
    "tools": ("tool", None),
    "tools/toys": ("toy", None),
    "tools/weapons": ("weapon", None),
    "transportation": ("transportation picture", None),  # a mix of vehicles and road signs
    "transportation/aiga-symbols": ("transport symbol", "symbol"),
    "transportation/boating": ("sailing picture", None),
    "transportation/roadsigns": ("road sign", None),
    "transportation/vehicles": ("vehicle", None),
    "unsorted": (None, None),
}

# File-name tokens that are author names, truncated author names or file noise, not title words.
AUTHOR_TOKENS = frozenset("""
    abiclipa alcalde alejandro alex andreas andy anthony anton ar ara arauj araujo arc arch archi archit
    archite architet architett architetto arki ashton aubanel ba bal bali balin ben benj benji bertle
    bogdan boitel boyer brady brice brill buc bucu buculei cagl cagle cedric celso charles cheng christoph
    costea dan daniel dave dennis diet dietri dietrich eady enrique erich fidi fr fra fran franc frances
    francesc francesco frederic frouke fudriot gabrielle gans ganson gates ger gera geral gerald gerhard
    gerhards gerhrads gluc gu guillaume guillo guillou honeychur jakob jakobs james jarno jean jo joel
    johnson jon jonadab jonathan josu juliane kim krug kuehne kurt leif liekens linda lumen luiz mateya
    matt matthew mauro mccann mccolm md meijer meza michael mike mimooh mirjam mitchell mo moser nathan
    natha nicolas nicu nilsson nowick nowicki nurbldoff olivier olivo omic otto park patricia pena peterm
    petr petri phillip phillips pierre rolland rollan rollandin romus rory sergio shandy snuatautisticido
    staudt stefan steffen stu studio susan tanguy teja tejad tess tobias todd toh uliphant vas vasa
    vasam vasama vasamaa vic victo victor yen yve yves zazou
    bw png svg jpg pt step
""".split())

# A few frequent Italian / French / Spanish title words, in English.
TRANSLATE = {
    "abeille": "bee", "acquila": "eagle", "albero": "tree", "antilope": "antelope", "aquila": "eagle",
    "arbre": "tree", "bambina": "girl", "bambino": "child", "barca": "boat", "bicicletta": "bicycle",
    "cane": "dog", "canguro": "kangaroo", "casa": "house", "cavallo": "horse", "chiesa": "church",
    "cigni": "swans", "cigno": "swan", "civetta": "owl", "coccinella": "ladybug", "coccinellona": "ladybug",
    "coniglio": "rabbit", "donna": "woman", "elefante": "elephant", "estrella": "star", "farfalla": "butterfly",
    "farfalle": "butterflies", "fiore": "flower", "fiori": "flowers", "foglie": "leaves", "formica": "ant",
    "formichina": "ant", "formicona": "ant", "fragola": "strawberry", "gabbiano": "seagull", "gallo": "rooster",
    "gatto": "cat", "gufo": "owl", "insetto": "insect", "leone": "lion", "libellula": "dragonfly",
    "libellule": "dragonfly", "limone": "lemon", "lucertola": "lizard", "mela": "apple", "moschito": "mosquito",
    "nonno": "grandfather", "orso": "bear", "pasteque": "watermelon", "pera": "pear", "pesce": "fish",
    "pinguino": "penguin", "pollo": "chicken", "prugna": "plum", "ragazza": "girl", "rana": "frog",
    "signora": "lady", "signore": "man", "signorina": "young woman", "tigre": "tiger", "tigri": "tigers",
    "trattore": "tractor", "treno": "train", "uomo": "man", "zanzara": "mosquito", "glace": "ice cream",
    "gelato": "ice cream", "voiture": "car", "maison": "house", "fleur": "flower",
}

CAT_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "clip art of a {c}.")
CAT_TITLE_TEMPLATES = ("clip art of a {c}: {t}.", "{t}, a {c}.", "a {c}: {t}.", "a drawing of a {c}, {t}.")
TITLE_TEMPLATES = ("a picture of {t}.", "{t}.")
PARENT_TEMPLATES = ("a {c}, a kind of {p}.",)


def title_words(stem: str) -> str:
    words = []
    for tok in re.split(r"[^a-z]+", stem.lower()):
        if len(tok) < 2 or tok in AUTHOR_TOKENS:
            continue
        words.append(TRANSLATE.get(tok, tok))
    return " ".join(words)


def category_of(rel_dir: str) -> tuple[str | None, str | None, str]:
    """(phrase, broader phrase, extra title words) of a folder relative to the png root."""
    parts = rel_dir.split("/") if rel_dir not in ("", ".") else []
    for cut in range(len(parts), 0, -1):
        key = "/".join(parts[:cut])
        if key in CATEGORIES:
            phrase, parent = CATEGORIES[key]
            extra = " ".join(p.replace("_", " ").replace("-", " ").lower() for p in parts[cut:])
            return phrase, parent, extra
    return None, None, ""


def caption_options(rel_paths: list[str]) -> list[str]:
    """Every caption one image may get (one is drawn per epoch)."""
    out = []
    for rel in rel_paths:
        rel_dir, stem = rel.rsplit("/", 1)[0] if "/" in rel else "", Path(rel).stem
        phrase, parent, extra = category_of(rel_dir)
        title = " ".join(w for w in (title_words(stem), extra) if w)
        if phrase:
            out += [t.format(c=phrase) for t in CAT_TEMPLATES]
            if title:
                out += [t.format(c=phrase, t=title) for t in CAT_TITLE_TEMPLATES]
            if parent:
                out += [t.format(c=phrase, p=parent) for t in PARENT_TEMPLATES]
                out += [t.format(c=parent) for t in CAT_TEMPLATES]
        if title:
            out += [t.format(t=title) for t in TITLE_TEMPLATES]
    return sorted(set(out)) or ["clip art."]


# ----------------------------------------------------------------------------------------------- #
# data: index, held-out exclusion, decoding (cached)
# ----------------------------------------------------------------------------------------------- #
def index_sources(root: Path) -> list[dict]:
    """One entry per distinct file content: sha256 and every path (relative to root) that holds it."""
    by_sha: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*.png")):
        if p.is_file():
            by_sha.setdefault(bdd.sha256_file(p), []).append(p.relative_to(root).as_posix())
    return [{"sha256": sha, "paths": paths} for sha, paths in sorted(by_sha.items(), key=lambda kv: kv[1][0])]


def heldout_keys(heldout_tsv: Path, root: Path) -> dict:
    """Paths, sha256s, families and near-duplicate keys of the held-out source images."""
    rows = bdd.read_sources(heldout_tsv)
    paths, shas, families, thumbs = set(), set(), set(), []
    for r in rows:
        src = Path(r["source"])
        try:
            rel = src.relative_to(root).as_posix()
        except ValueError:
            raise SystemExit(f"held-out source {src} is not under {root}; pass the png root the demo set was "
                             "built from (--source)") from None
        if not src.is_file() or bdd.sha256_file(src) != r["sha256"]:
            raise SystemExit(f"held-out source {src} is missing or differs from the one in {heldout_tsv}; "
                             f"install openclipart-png {r['version']}")
        img = bdd.convert(src, STORE_SIDE)
        if img is None:
            raise SystemExit(f"held-out source {src} cannot be decoded")
        paths.add(rel)
        shas.add(r["sha256"])
        families.add(bdd.family_key(src.stem))
        thumbs.append(bdd.thumbnails(img).reshape(2, -1))
    return {"paths": paths, "sha256": shas, "families": families, "thumbs": np.stack(thumbs), "count": len(rows)}


def centre_square(img) -> np.ndarray:
    w, h = img.size
    left, top = (w - STORE_SIDE) // 2, (h - STORE_SIDE) // 2
    return np.asarray(img.crop((left, top, left + STORE_SIDE, top + STORE_SIDE)), dtype=np.uint8)


def decode_all(root: Path, entries: list[dict], work_dir: Path, log) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Decode every entry once (cached in work_dir): 112x112 RGB squares, near-duplicate keys, and the
    indices of the usable entries."""
    key = hashlib.sha256(json.dumps([PREPROCESS_VERSION, STORE_SIDE, bdd.MAX_SOURCE_PIXELS,
                                     [e["sha256"] for e in entries]]).encode()).hexdigest()[:16]
    cache = work_dir / f"decoded-{key}.npz"
    if cache.is_file():
        z = np.load(cache)
        log(f"decoded images: reusing {cache}")
        return z["images"], z["thumbs"], z["usable"].tolist()
    t0 = time.time()
    images, thumbs, usable = [], [], []
    for i, e in enumerate(entries):
        img = bdd.convert(root / e["paths"][0], STORE_SIDE)
        if img is not None:
            images.append(centre_square(img))
            thumbs.append(bdd.thumbnails(img).reshape(2, -1).astype(np.float16))
            usable.append(i)
        if (i + 1) % 1000 == 0:
            log(f"decoded {i + 1}/{len(entries)} ({time.time() - t0:.0f} s)")
    images, thumbs = np.stack(images), np.stack(thumbs)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, thumbs=thumbs, usable=np.array(usable))
    os.replace(tmp, cache)
    log(f"decoded {len(usable)} usable of {len(entries)} in {time.time() - t0:.0f} s -> {cache}")
    return images, thumbs, usable


def exclusion_reason(entry: dict, thumb: np.ndarray, held: dict, held_dihedral: np.ndarray) -> str | None:
    if any(p in held["paths"] for p in entry["paths"]):
        return "path"
    if entry["sha256"] in held["sha256"]:
        return "sha256"
    if any(bdd.family_key(Path(p).stem) in held["families"] for p in entry["paths"]):
        return "family"
    # held_dihedral: (8*N, 2, P) keys of every rotation/mirror of every held-out image
    sim = np.einsum("kp,mkp->mk", thumb.astype(np.float32), held_dihedral).max()
    if sim >= bdd.NEAR_DUP_SIMILARITY:
        return "near-duplicate"
    return None


# ----------------------------------------------------------------------------------------------- #
# training
# ----------------------------------------------------------------------------------------------- #
def build_model(seed: int):
    import open_clip

    from cachekit.models import register_tiny_configs

    register_tiny_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL_NAME), open_clip.get_model_preprocess_cfg(model)


def random_crops(batch_u8: torch.Tensor, out: int, gen: torch.Generator, scale=(0.5, 1.0),
                 ratio=(3 / 4, 4 / 3), grey_p: float = 0.2) -> torch.Tensor:
    """Augmented views of a (B, H, W, 3) uint8 batch as (B, 3, out, out) floats in [0, 1]: random-resized
    crops (bilinear), horizontal flips (p 0.5) and grey-level copies (p ``grey_p``)."""
    from torchvision.ops import roi_align

    b, h, w, _ = batch_u8.shape
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255)
    area = torch.empty(b).uniform_(*scale, generator=gen) * h * w
    logr = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(max=w)
    ch = torch.sqrt(area / r).clamp(max=h)
    x0 = torch.rand(b, generator=gen) * (w - cw)
    y0 = torch.rand(b, generator=gen) * (h - ch)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
    y = roi_align(x, boxes, output_size=out, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flip = torch.rand(b, generator=gen) < 0.5
    y = torch.where(flip.view(b, 1, 1, 1), y.flip(-1), y)
    grey = torch.rand(b, generator=gen) < grey_p
    lum = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1).expand_as(y)
    return torch.where(grey.view(b, 1, 1, 1), lum, y)


def encode_text_short(model, tok: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on the first L positions only, L = the longest caption of the batch. Exact:
    the text transformer is causal and pools at the end-of-text token, so later (padding) positions
    never reach the output."""
    n = int((tok != 0).sum(1).max())
    tok = tok[:, :n]
    x = model.token_embedding(tok) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tok.argmax(dim=-1)]
    return x @ model.text_projection


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fp16_state_dict(model) -> dict:
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
            for k, v in model.state_dict().items()}


def train(args) -> int:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fh = open(log_path, "w", encoding="utf-8")

    def log(msg: str):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def record(obj: dict):
        log_fh.write(json.dumps(obj, sort_keys=True) + "\n")
        log_fh.flush()

    root = Path(args.source)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder; install the source images: apt-get install -y openclipart-png")
    entries = index_sources(root)
    log(f"{sum(len(e['paths']) for e in entries)} files, {len(entries)} distinct contents under {root}")
    held = heldout_keys(Path(args.heldout), root)
    held_dihedral = np.concatenate([bdd.dihedral(t.reshape(2, bdd.THUMB, bdd.THUMB)) for t in held["thumbs"]])
    images, thumbs, usable = decode_all(root, entries, Path(args.work_dir), log)

    keep, reasons = [], {"path": 0, "sha256": 0, "family": 0, "near-duplicate": 0}
    excluded = []
    for row, i in enumerate(usable):
        why = exclusion_reason(entries[i], thumbs[row], held, held_dihedral)
        if why:
            reasons[why] += 1
            excluded.append({"paths": entries[i]["paths"], "reason": why})
        else:
            keep.append(row)
    log(f"held out: {held['count']} demo images; excluded from pretraining: {reasons}; "
        f"training on {len(keep)} images")
    # the primary folder of an image (for the per-folder cap): its deepest folder, then by name
    folder = [sorted((p.rsplit("/", 1)[0] if "/" in p else "" for p in entries[usable[r]]["paths"]),
                     key=lambda d: (-d.count("/"), d))[0] for r in keep]
    captions = [caption_options(entries[usable[r]]["paths"]) for r in keep]

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model, tokenizer, pre = build_model(args.seed)
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    size = int(pre["size"] if isinstance(pre["size"], int) else pre["size"][0])
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    by_folder: dict[str, list[int]] = {}
    for j, f in enumerate(folder):
        by_folder.setdefault(f, []).append(j)
    per_epoch = sum(min(len(v), args.folder_cap) for v in by_folder.values())
    steps_per_epoch = per_epoch // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = min(args.warmup, total // 4)
    record({"event": "start", "model": MODEL_NAME, "description": DESCRIPTION, "seed": args.seed,
            "threads": args.threads, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup_steps": warmup, "folder_cap": args.folder_cap,
            "files": sum(len(e["paths"]) for e in entries), "distinct": len(entries),
            "usable": len(usable), "heldout": held["count"], "heldout_list_sha256": bdd.sha256_file(Path(args.heldout)),
            "excluded": reasons, "train_images": len(keep),
            "images_per_epoch": per_epoch, "steps": total, "torch": torch.__version__})
    log(f"{per_epoch} images per epoch (folders capped at {args.folder_cap}), {steps_per_epoch} steps x "
        f"{args.epochs} epochs")

    images_t = torch.from_numpy(images)
    step = 0
    model.train()
    for epoch in range(args.epochs):
        t_epoch = time.time()
        order = []
        for f in sorted(by_folder):
            members = by_folder[f]
            order += rng.sample(members, min(len(members), args.folder_cap))
        rng.shuffle(order)
        texts = [rng.choice(captions[j]) for j in order]
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            batch_texts = texts[s * args.batch_size:(s + 1) * args.batch_size]
            x = random_crops(images_t[[keep[j] for j in idx]], size, gen)
            x = (x - mean) / std
            tok = tokenizer(batch_texts)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            img_f = F.normalize(model.encode_image(x), dim=-1)
            txt_f = F.normalize(encode_text_short(model, tok), dim=-1)
            logits = model.logit_scale.exp() * img_f @ txt_f.t()
            # identical captions in a batch are positives of each other (soft targets)
            same = (tok.unsqueeze(1) == tok.unsqueeze(0)).all(-1).float()
            target = same / same.sum(1, keepdim=True)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        rec = {"event": "epoch", "epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
               "logit_scale": float(model.logit_scale.detach().exp()), "lr": lr_at(step - 1, total, warmup, args.lr),
               "epoch_seconds": round(time.time() - t_epoch, 1), "elapsed_seconds": round(time.time() - t_start, 1)}
        record(rec)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {rec['loss']:.4f}, logit scale {rec['logit_scale']:.1f}, "
            f"{rec['epoch_seconds']:.0f} s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(fp16_state_dict(model), tmp)
    os.replace(tmp, out)
    sha = bdd.sha256_file(out)
    record({"event": "done", "checkpoint": out.name, "sha256": sha, "bytes": out.stat().st_size,
            "elapsed_seconds": round(time.time() - t_start, 1)})
    if args.excluded_list:
        Path(args.excluded_list).write_text("".join(json.dumps(e) + "\n" for e in excluded), encoding="utf-8")
    log(f"wrote {out} ({out.stat().st_size} bytes, sha256 {sha}); log {log_path}")
    log_fh.close()
    return 0


# ----------------------------------------------------------------------------------------------- #
# evaluation on the held-out demo images (zero-shot and few-shot class means)
# ----------------------------------------------------------------------------------------------- #
def evaluate(checkpoint: str, data: str, shots=(1, 2, 4, 8, 16), seeds=(1, 2, 3), threads: int = 1) -> dict:
    """Zero-shot ("a photo of a {}.") and K-shot nearest-class-mean accuracy on cachekit's split of the
    demo images (its default val/test carving), with the model loaded by cachekit.models.load_model."""
    from cachekit.augment import plain_transform
    from cachekit.data import load_dataset
    from cachekit.models import encode_templates, load_model, text_classifier
    from PIL import Image

    torch.set_num_threads(threads)
    bundle = load_model(MODEL_NAME, pretrained=checkpoint)
    spec = load_dataset(data)
    pc = bundle.preprocess_cfg
    tf = plain_transform(bundle.image_size, pc["mean"], pc["std"], pc.get("interpolation", "bicubic"))
    feats, labels = {}, {}
    with torch.inference_mode():
        for split in ("train", "val", "test"):
            items = spec.splits[split]
            x = torch.stack([tf(Image.open(spec.root / it.path).convert("RGB")) for it in items])
            feats[split] = F.normalize(bundle.model.encode_image(x).float(), dim=-1)
            labels[split] = torch.tensor([it.label for it in items])
    emb, _ = encode_templates(bundle, spec.classnames, ["a photo of a {}."])
    w = text_classifier(emb)
    out = {"classes": len(spec.classnames), "chance": 100.0 / len(spec.classnames),
           "n": {s: len(v) for s, v in labels.items()}}
    for split in ("val", "test"):
        out[f"zeroshot_{split}"] = 100.0 * float(((feats[split] @ w.t()).argmax(1) == labels[split]).float().mean())
    for k in shots:
        accs = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            means = []
            for c in range(len(spec.classnames)):
                idx = (labels["train"] == c).nonzero().flatten()
                pick = idx[torch.randperm(len(idx), generator=g)[:k]]
                means.append(feats["train"][pick].mean(0))
            m = F.normalize(torch.stack(means), dim=-1)
            accs.append(100.0 * float(((feats["test"] @ m.t()).argmax(1) == labels["test"]).float().mean()))
        out[f"classmean_{k}shot_test"] = float(np.mean(accs))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and write the checkpoint and the training log")
    t.add_argument("--source", default=str(DEFAULT_SOURCE), help="png root of openclipart-png")
    t.add_argument("--heldout", default=str(DEFAULT_HELDOUT), help="SOURCES.tsv of the held-out demo set")
    t.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint path (fp16 open_clip state dict)")
    t.add_argument("--log", default=None, help="training log, JSON lines (default: OUT with .log.jsonl)")
    t.add_argument("--work-dir", default=str(DEFAULT_WORK), help="cache of decoded images")
    t.add_argument("--excluded-list", default=None, help="also write the excluded source files (JSON lines)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, byte for byte)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    t.add_argument("--folder-cap", type=int, default=200, help="at most this many images per folder per epoch")
    e = sub.add_parser("eval", help="zero-shot and class-mean few-shot accuracy on the held-out demo images")
    e.add_argument("checkpoint")
    e.add_argument("--data", default=str(REPO / "cachekit" / "demo_data" / "openclipart"))
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        return train(args)
    print(json.dumps(evaluate(args.checkpoint, args.data, threads=args.threads), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
