"""Rebuild the embedded OpenClipart demo dataset shipped in ``cachekit/demo_data``.

The source is the Debian package ``openclipart-png`` (public-domain clip art,
installed under ``/usr/share/openclipart/png``).  The demo images are also the
held-out evaluation set of the cachekit mini-CLIP (``tools/train_mini_clip.py``
reads ``SOURCES.tsv`` and keeps every one of these images, and anything that
looks like one of them, out of its pretraining set).

Selection is fully deterministic.  For every class the candidate files of its
source folders are filtered with a fixed include/exclude list (curated by eye
so that every image really shows the class), sorted by path, reduced to one
file per distinct content (sha256) and per drawing family (see
``family_key``), and ``count`` images are taken at evenly spaced positions of
that list.  When the image at a position is unusable (broken, tiny, blank,
near-empty, over ``MAX_SOURCE_PIXELS``) or looks like an image already chosen
for any class (``near_duplicate``: grey-level or edge thumbnails that match
under a rotation or mirror), the next candidate is taken instead.

Each image is composited onto a white background (clip art has transparency),
cropped to its content, padded with white to an aspect ratio of at most 2:1 and
resized so that the shorter side is 96 px (the longer side is then <= 192 px),
the mini-CLIP's input size.  Most images are written as JPEG (quality 85);
every 10th image of a class (index 0, 10, 20, ...) is written as PNG so that
both decoders are exercised.

Usage (from the repository root, with the project virtualenv)::

    .venv/bin/python tools/build_demo_data.py \\
        /usr/share/openclipart/png cachekit/demo_data/openclipart

Only this script and ``tools/train_mini_clip.py`` need Pillow; nothing in the
cachekit package imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# The source files are trusted; a few of them are very large renders (up to 623 megapixels).
Image.MAX_IMAGE_PIXELS = None

PACKAGE = "openclipart-png"
SHORT_SIDE = 96
MAX_ASPECT = 2.0
JPEG_QUALITY = 85
PNG_EVERY = 10  # indices 0, 10, 20, ... of each class are stored as PNG
MIN_SOURCE_SIDE = 16  # smaller sources are skipped as unusable
MAX_SOURCE_PIXELS = 16_000_000  # 19 renders of 17-623 MP: skipped (decoding them takes minutes)
REDUCE_TO = 512  # larger sources are box-reduced to about this shorter side before anything else
MIN_INK_FRACTION = 0.02  # skip images whose visible content is this sparse
NEAR_DUP_SIMILARITY = 0.95  # thumbnail cosine similarity (grey or edges, any rotation/mirror): "the same"
THUMB = 16


@dataclass(frozen=True)
class ClassSpec:
    """Where a class comes from inside the package's png/ root."""

    folders: tuple[str, ...]
    recursive: bool = False  # also take the files of sub-folders
    skip_folders: tuple[str, ...] = field(default=())  # sub-folders (relative to the png root) left out
    skip_if_also_in: tuple[str, ...] = field(default=())  # leave out files whose content is also in these trees
    include: tuple[str, ...] = field(default=())  # file stems; empty = all
    exclude: tuple[str, ...] = field(default=())  # file stems


CLASS_SPECS: dict[str, ClassSpec] = {
    "building": ClassSpec(
        ("buildings", "buildings/homes"),
        exclude=(
            "brick_frouke_01", "capitello_modanatura_mo_01", "demolizione_costruzione_01",
            "home13",  # a tent
            "old_sign_ganson", "school_hallway_gerald_g._01", "wall", "wall1",
        ),
    ),
    "flag": ClassSpec(
        ("signs_and_symbols/flags",),
        recursive=True,
        skip_folders=("signs_and_symbols/flags/semaphore",),  # people signalling with flags
        # the flag folders also hold copies of maps, buildings and road signs
        skip_if_also_in=("geography", "buildings", "transportation"),
        exclude=("australia_mike_honeychur_01", "inuit_inukshuk_gerald_g._01", "madrid_01"),
    ),
    "fruit": ClassSpec(
        ("food/fruit",),
        exclude=(
            "apple_juice_box", "apple_juice_box_bw", "apple_mateya_01",
            "banana_mateya_01", "candied_apples_ganson", "champignon_01",
            "eris_apple_nurbldoff_01", "gumnut_black_01", "gumnut_shaded_01",
            "juice_glass_andremarcel._01", "kallisti-grenade_1_nurbl_01",
            "pie_apple", "pie_apple_bw", "pie_cherry", "pie_cherry_bw",
            "slate-apple_benji_park_01", "straw_tote_linda_kim_01",
            "tile_orange_gabriel_lo_i_01", "tree_whit_fruits_01",
            "turkey_platter_01_with_fruit_and_vegitables_01",
        ),
    ),
    "insect": ClassSpec(
        ("animals/bugs",),
        exclude=(
            "lumaca_architetto_france_01", "lumaca_turbo_architetto__01",
            "mostriciattolo2_architet_01", "mostriciattolo_architett_01",
            "ragnetto_incazzato_archi_01", "ragno_figo_architetto_fr_01",
            "spider", "virus_andreas_nilsson_01", "zanzara_cretina_architet_01",
        ),
    ),
    "map": ClassSpec(
        ("geography",),
        exclude=(
            "arkansas_symbol_ganson", "ayers_rock_ganson", "calebasse_01", "canada_umbrella_ganson",
            "earth_and_north_star_dan_01", "earth_globe_dan_gerhrads_01", "eclipse_josu_alcalde_ba_01r",
            "eclipse_josu_alcalde_bas_", "eclipse_josu_alcalde_go_01r", "eiffel_tower_michael_ja_r",
            "garmin_handheld_gps_gera_01", "globe_01", "globe_marcelo_staudt_", "gps_geko__ganson",
            "gps_geko_ganson1", "magelan_handheld_gps_ger_01", "moon_charles_mccolm_01",
            "mount_hood_dan_gerhards_01", "mountain_seal_mitchell_j_", "northern_hemisphere_glo_",
            "planet_costea_bogdan_r", "planet_earth_dan_gerhard_01", "pseudo_globe_twilight_",
            "shi_ken_01", "spyglass_vladimir_hernan_01", "svg_globe", "svg_globe_blue", "svg_globe_green",
            "symbol_for_a_church_on__01", "teide_clemente_01", "war_drum_enrique_meza_c_01",
            "war_drum_enrique_meza_c_02", "wire_globe_01",
        ),
    ),
    "mammal": ClassSpec(
        ("animals/mammals",),
        recursive=True,
        exclude=(
            "crazy_monkey_shandy_brow_01", "emule_icon_emule.org_01",
            "mhooo_peterm_", "shaezy_peterm_", "skoynk_peterm_",
            "squeek_peterm_", "toro_al_tramonto_archite_01",
        ),
    ),
    "person": ClassSpec(
        ("people",),
        include=(
            "a_boy_plays_soccer_01", "a_happy_boy_01", "a_youngster_01",
            "aerobics_architetto_fran_01", "architetto_architetto_fr_01",
            "baby_anthony_liekens_01", "ballerina_architetto_fra_01",
            "blacksmiti_ganson", "blue_girl_dirk_struve_", "boy_astrid_graeber_",
            "bride1_jarno_vasamaa_01", "brozo_the_clown_enrique__01",
            "bussiness_woman_donna_i_01", "busy_mom_with_child_and_01",
            "donna_incinta_architetto_01", "female_rollandin_frances_",
            "golf_drive_ganson", "grandpa_01",
            "groom1_jarno_vasamaa_01", "handstand_andrew_fitzsim_01",
            "happy_woman_dirk_struve_01", "hikinh_ganson", "man_01", "man_02",
            "man_chris_kempson_01", "man_in_chair_-_thinking_01",
            "manga_girl_dirk_struve_01", "nonno_sport_architetto_f_01",
            "pattinatrice_architetto__01", "police_man_ganson",
            "rich_young_man_counting_01", "roller_blader_ganson",
            "sailor_nicu_buculei_01", "signore_architetto_franc_01",
            "signorina_architetto_fra_01", "sport_architetto_frances_01",
            "wedding_couple_jarno_vas_", "woman02", "woman_01",
            "woman_chemist_gerald_g._01", "woman_doctor_gerald_g._01",
            "woman_fashion_01_gerald__01", "woman_fashion_02_gerald__01",
            "woman_nurse_gerald_g._01", "woman_police_01_gerald_g_01",
            "woman_police_02_gerald_g_01", "woman_reading_gerald_g._01",
            "yoga_architetto_francesc_01",
        ),
    ),
    "playing_card": ClassSpec(
        ("recreation/games/cards",),
        recursive=True,
        exclude=(
            "andalusia_01", "as_carreau_jean_victor_b_", "as_coeur_jean_victor_bal_",
            "as_pique_jean_victor_bal_", "as_trefle_jean_victor_ba_", "audio_cassette_mo_01", "brown_hair_boy_face_mike_02",
            "celtic-vine-corner_steve_01", "jacob_leisler_mo_01", "photo_rikva_01",
            "two_cats_tess_brady_01",
        ),
    ),
    "road_sign": ClassSpec(
        ("transportation/roadsigns",),
        exclude=(
            "advertising_yves_guillo_r", "ampelfrau_matthew_gates_01",
            "ampelmaennchen_matthew_g_01", "bus_symbol_black_01", "nws_government_website__01",
            "route_jakob_chaosinfa_", "stop",  # "stop": cut off at the bottom
        ),
    ),
    "vehicle": ClassSpec(
        ("transportation/vehicles", "transportation"),
        recursive=True,
        include=(
            "1989_chevrolet_celebrit_01", "1989_chevrolet_celebrit_02", "4wd", "_chevrolet_celebirt_",
            "aircraft_jarno_vasamaa1", "aircraft_jarno_vasamaa2", "aircraft_jarno_vasamaa3",
            "aircraft_jarno_vasamaa4", "aircraft_jarno_vasamaa_", "airplane_nicu_buculei_01",
            "ambulans_romus_01", "autos_01", "bicicletta_cycle_archite_01", "bicycle_01",
            "bicycle_philippe_colin_01", "big_truck_01", "bike_tobias_jakobs_", "blazer_01",
            "bmw_z_from_top_aubanel_", "bus1_bw_jarno_vasamaa_01", "bus1_jarno_vasamaa_01",
            "bus2_bw_jarno_vasamaa_01", "bus2_jarno_vasamaa_01", "bus_01", "car", "car_jamin_ellis_",
            "departing_plane_01", "dodge_neon_green_ganson", "dodge_neon_pink_ganson",
            "fire_engine_romus_01", "formula_one_car_gerald_g_01", "formula_one_car_gerald_g_02",
            "hummer_01", "hummer_02", "hummer_03", "hummer_04", "hummer_05", "hummer_06", "hummer_07",
            "m1_abrams_main_battle_tank_01", "military_airplane_mo_01", "motorcycle_jarno_vasama_",
            "old_car_lumen_design_st_r", "old_truck_indana_model__01", "pallone_aerestatico_arch_01",
            "plane_in_the_sky_mo_01", "plane_silhouet_mo_01", "redcar_marcelo_caiafa_", "rocket",
            "skoda_car_alejandro_teja_", "sledge_01", "small_truck_steffen_gluc_01",
            "soviet_shuttle_mo_01", "sportcar_sergio_luiz_ara_01", "toyota_land_cruiser_ganson",
            "tramway_lumen_design_stu_01", "trattore_architetto_fran_01", "trawler_01",
            "truck_jarno_vasamaa1", "truck_jarno_vasamaa_", "vtt_02",
        ),
    ),
}

DEFAULT_CLASSES = ",".join(CLASS_SPECS)
DEFAULT_COUNT = 32


def package_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(stem: str, limit: int = 24) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    return s[:limit].rstrip("_") or "img"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_VARIANT_WORDS = ("bw", "black", "white", "outline", "shaded", "shading", "colour", "color", "red", "green",
                  "blue", "yellow", "pink", "purple", "seagreen", "orange")
_VARIANT_TOKEN = re.compile(r"(?<![a-z0-9])(?:" + "|".join(_VARIANT_WORDS) + r")(?![a-z0-9])")
_FAMILY_SUFFIX = re.compile(r"(?:_?0\d[a-c]?|(?<=[\d_])r|_)$")


def family_key(stem: str) -> str:
    """The drawing family of a file stem: the stem without variant words and numbering suffixes.

    Variant words (``bw``, ``black``, ``outline``, ``shaded``, colour names...) are dropped wherever
    they stand as a word; then zero-padded counters (``_01``, ``03b``) and a trailing ``r`` after a
    digit or ``_`` are stripped from the end (``_01``, ``01r``, ``_r``). When that leaves nothing (a
    drawing named after a colour, such as ``orange``), the first word stays. So ``man_01``/``man_02``,
    ``bus1_jarno_vasamaa_01``/``bus1_bw_jarno_vasamaa_01``, ``queensland-black``/``-shaded`` and
    ``people_juliane_krug_03a``/``_03b`` each share a key, and ``orange``/``orange_bw_02`` too.
    Numbers that are not zero-padded (``bordered_c_10``, ``star_05pt02step``) are kept: they name
    different drawings.
    """
    words = stem.lower().replace("_", " ").replace("-", " ").split()
    key = _strip_counters("_".join(_VARIANT_TOKEN.sub("", " ".join(words)).split()))
    if not key:  # named after a colour ("orange", the fruit): its first word stays
        key = _strip_counters("_".join(words[:1] + _VARIANT_TOKEN.sub("", " ".join(words[1:])).split()))
    return key or stem.lower()


def _strip_counters(s: str) -> str:
    while True:
        t = _FAMILY_SUFFIX.sub("", s)
        if t == s:
            return s
        s = t


def convert(src: Path, short_side: int = SHORT_SIDE) -> Image.Image | None:
    """Load one clip-art file and produce the demo image, or None if unusable.

    White background, cropped to the content (pixels darker than 245 after compositing) with a 4%
    margin, padded with white to an aspect ratio of at most 2:1, shorter side ``short_side``.
    Large sources are first reduced (box filter, by an integer factor) to a shorter side of at least
    ``REDUCE_TO`` px.
    """
    try:
        with Image.open(src) as im:
            if min(im.size) < MIN_SOURCE_SIDE or im.size[0] * im.size[1] > MAX_SOURCE_PIXELS:
                return None
            im.load()
            rgba = im.convert("RGBA")
    except Exception:  # broken / unreadable file
        return None
    factor = min(rgba.size) // REDUCE_TO  # independent of short_side: same crop and checks at any size
    if factor > 1:
        rgba = rgba.reduce(factor)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    rgb = white.convert("RGB")
    ink = rgb.convert("L").point(lambda v: 255 if v < 245 else 0)
    bbox = ink.getbbox()
    if bbox is None:
        return None  # blank
    rgb, ink = rgb.crop(bbox), ink.crop(bbox)
    w, h = rgb.size
    if min(w, h) < 4:
        return None
    if ink.histogram()[255] / float(w * h) < MIN_INK_FRACTION:
        return None  # near-empty (faint sketch, stray pixels)
    margin = max(1, round(0.04 * max(w, h)))
    w2, h2 = w + 2 * margin, h + 2 * margin
    if w2 > MAX_ASPECT * h2:
        h2 = int(round(w2 / MAX_ASPECT))
    elif h2 > MAX_ASPECT * w2:
        w2 = int(round(h2 / MAX_ASPECT))
    canvas = Image.new("RGB", (w2, h2), (255, 255, 255))
    canvas.paste(rgb, ((w2 - w) // 2, (h2 - h) // 2))
    scale = short_side / min(w2, h2)
    size = (
        min(int(MAX_ASPECT * short_side), max(1, round(w2 * scale))),
        min(int(MAX_ASPECT * short_side), max(1, round(h2 * scale))),
    )
    return canvas.resize(size, Image.Resampling.LANCZOS)


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else a


def thumbnails(img: Image.Image) -> np.ndarray:
    """The near-duplicate keys of an image: (2, 16, 16), each mean-removed with unit norm.

    [0]: the grey-level thumbnail (aspect ignored); [1]: the thumbnail of the grey-level gradient
    magnitude (edges), which also matches a black-and-white outline version of a coloured drawing.
    Both ignore hue, so recolourings match too.
    """
    g = img.convert("L")
    grey = np.asarray(g.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float32)
    a = np.asarray(g.resize((4 * THUMB, 4 * THUMB), Image.Resampling.BOX), dtype=np.float32)
    gx = np.abs(np.diff(a, axis=1))[:-1, :]
    gy = np.abs(np.diff(a, axis=0))[:, :-1]
    edges = Image.fromarray(np.sqrt(gx * gx + gy * gy)).resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.stack([_unit(grey), _unit(np.asarray(edges, dtype=np.float32))])


def dihedral(t: np.ndarray) -> np.ndarray:
    """The 8 rotations/mirrors of a (K, H, W) key stack: (8, K, H*W)."""
    out = []
    for flip in (False, True):
        b = t[:, :, ::-1] if flip else t
        for k in range(4):
            out.append(np.rot90(b, k, axes=(1, 2)).reshape(t.shape[0], -1))
    return np.stack(out)


def max_similarity(t: np.ndarray, bank: np.ndarray) -> float:
    """Highest cosine similarity of key stack ``t`` (K, H, W), under any rotation or mirror and in any
    key, to the entries of ``bank`` (N, K, H*W)."""
    if len(bank) == 0:
        return -1.0
    return float(np.einsum("dkp,nkp->dkn", dihedral(t), bank).max())


def near_duplicate(t: np.ndarray, bank: np.ndarray) -> bool:
    return max_similarity(t, bank) >= NEAR_DUP_SIMILARITY


def candidates(root: Path, spec: ClassSpec) -> list[Path]:
    """The class's source files, filtered, sorted by path, one per content hash and drawing family."""
    files: dict[str, Path] = {}
    for folder_name in spec.folders:
        folder = root / folder_name
        if not folder.is_dir():
            raise SystemExit(f"source folder not found: {folder}")
        found = folder.rglob("*.png") if spec.recursive else folder.glob("*.png")
        for p in found:
            rel_dir = p.parent.relative_to(root).as_posix()
            if p.is_file() and not any(rel_dir == f or rel_dir.startswith(f + "/") for f in spec.skip_folders):
                files.setdefault(p.relative_to(root).as_posix(), p)
    paths = [files[k] for k in sorted(files)]
    stems = {p.stem for p in paths}
    if spec.include:
        missing = set(spec.include) - stems
        if missing:
            raise SystemExit(f"{spec.folders}: missing include files {sorted(missing)}")
        paths = [p for p in paths if p.stem in set(spec.include)]
    unknown = set(spec.exclude) - stems
    if unknown:
        raise SystemExit(f"{spec.folders}: exclude list names files that do not exist: {sorted(unknown)}")
    paths = [p for p in paths if p.stem not in set(spec.exclude)]
    if spec.skip_if_also_in:
        elsewhere = {sha256_file(q) for f in spec.skip_if_also_in for q in (root / f).rglob("*.png")}
        paths = [p for p in paths if sha256_file(p) not in elsewhere]
    seen_sha, seen_family, out = set(), set(), []
    for p in paths:
        sha, fam = sha256_file(p), family_key(p.stem)
        if sha in seen_sha or fam in seen_family:
            continue
        seen_sha.add(sha)
        seen_family.add(fam)
        out.append(p)
    return out


def evenly_spaced(n_items: int, count: int) -> list[int]:
    if count >= n_items:
        return list(range(n_items))
    return [(i * n_items) // count for i in range(count)]


def select(root: Path, name: str, count: int, bank: list[np.ndarray], used_sha: set[str]):
    """Choose ``count`` images of class ``name``: evenly spaced over its candidates, walking forward
    past unusable files and near-duplicates of anything already chosen (any class)."""
    spec = CLASS_SPECS[name]
    cands = candidates(root, spec)
    if len(cands) < count:
        raise SystemExit(f"{name}: only {len(cands)} distinct candidates, need {count}")
    taken: set[int] = set()
    chosen: list[tuple[Path, Image.Image]] = []
    skipped = 0
    for start in evenly_spaced(len(cands), count):
        pos = start
        while True:
            if len(taken) == len(cands):
                raise SystemExit(f"{name}: ran out of usable distinct candidates ({len(chosen)} of {count})")
            while pos in taken:
                pos = (pos + 1) % len(cands)
            taken.add(pos)
            path = cands[pos]
            sha = sha256_file(path)
            img = convert(path) if sha not in used_sha else None
            if img is not None:
                t = thumbnails(img)
                if not near_duplicate(t, np.stack(bank) if bank else np.zeros((0, 2, THUMB * THUMB))):
                    bank.append(t.reshape(2, -1))
                    used_sha.add(sha)
                    chosen.append((path, img))
                    break
            skipped += 1
            print(f"  skip {path.relative_to(root)} (unusable or a near-duplicate)", file=sys.stderr)
    return chosen, len(cands), skipped


def build(root: Path, out: Path, classes: list[str], count: int) -> list[tuple[str, str]]:
    version = package_version()
    rows: list[tuple[str, ...]] = []
    summary: list[tuple[str, str]] = []
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # make the rebuild exact: drop every class folder, then write the new ones
        if old.is_dir():
            shutil.rmtree(old)
    bank: list[np.ndarray] = []
    used_sha: set[str] = set()
    for name in classes:
        chosen, n_cands, skipped = select(root, name, count, bank, used_sha)
        cdir = out / name
        cdir.mkdir(parents=True)
        for i, (path, img) in enumerate(chosen):
            stem = f"{i:02d}_{slug(path.stem)}"
            if i % PNG_EVERY == 0:
                fname = stem + ".png"
                img.save(cdir / fname, format="PNG", optimize=True)
            else:
                fname = stem + ".jpg"
                img.save(cdir / fname, format="JPEG", quality=JPEG_QUALITY, optimize=True)
            rows.append((f"{name}/{fname}", str(path), version, sha256_file(path)))
        folders = ", ".join(CLASS_SPECS[name].folders)
        summary.append((name, f"{len(chosen)} of {n_cands} distinct candidates from {folders} "
                              f"({skipped} skipped)"))
    rows.sort()
    with open(out / "SOURCES.tsv", "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write("\t".join(row) + "\n")
    return summary


def read_sources(path: Path) -> list[dict]:
    """Rows of a SOURCES.tsv: image (relative path), source (original file), version, sha256."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            image, source, version, sha = line.split("\t")
            out.append({"image": image, "source": source, "version": version, "sha256": sha})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source_root", type=Path,
                    help="png root of openclipart-png, e.g. /usr/share/openclipart/png")
    ap.add_argument("output_dir", type=Path,
                    help="output folder, e.g. cachekit/demo_data/openclipart")
    ap.add_argument("--classes", default=DEFAULT_CLASSES,
                    help=f"comma-separated class names from: {', '.join(CLASS_SPECS)} (default: all)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="images per class")
    args = ap.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown:
        ap.error(f"unknown classes {unknown}; known: {sorted(CLASS_SPECS)}")
    for name, info in build(args.source_root, args.output_dir, classes, args.count):
        print(f"{name}: {info}")
    total = sum(f.stat().st_size for f in args.output_dir.rglob("*") if f.is_file())
    print(f"total {total / 1e6:.2f} MB ({total} bytes) in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
