"""Rebuild the embedded OpenClipart demo dataset shipped in ``cachekit/demo_data``.

The source is the Debian package ``openclipart-png`` (public-domain clip art,
installed under ``/usr/share/openclipart/png``).  The selection is fully
deterministic: for every class the candidate files of one source folder are
filtered with a fixed include/exclude list (curated by eye so that every image
really shows the class), sorted by name, broken / near-empty files are skipped,
and ``count`` images are taken at evenly spaced positions of the sorted list.

Each image is composited onto a white background (clip art has transparency),
cropped to its content, padded with white to an aspect ratio of at most 2:1 and
resized so that the shorter side is 80 px (the longer side is then <= 160 px).
Most images are written as JPEG (quality 85); every 10th image of a class
(index 0, 10, 20, ...) is written as PNG so that both decoders are exercised.

Usage (from the repository root, with the project virtualenv)::

    .venv/bin/python cachekit/demo_data/build_demo_data.py \\
        /usr/share/openclipart/png cachekit/demo_data/openclipart \\
        --classes bird,insect,mammal,house,fruit,flower,musical_instrument,vehicle,tool,person \\
        --count 30

Only this script needs Pillow; nothing in the cachekit package imports it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# The source files are trusted, some of them are very large renders.
Image.MAX_IMAGE_PIXELS = None

PACKAGE = "openclipart-png"
SHORT_SIDE = 80
LONG_SIDE_CAP = 160
MAX_ASPECT = LONG_SIDE_CAP / SHORT_SIDE
JPEG_QUALITY = 85
PNG_EVERY = 10  # indices 0, 10, 20, ... of each class are stored as PNG
MIN_SOURCE_SIDE = 16  # smaller sources are skipped as unusable
MIN_INK_FRACTION = 0.02  # skip images whose visible content is this sparse


@dataclass(frozen=True)
class ClassSpec:
    """Where a class comes from inside the package's png/ root."""

    folder: str
    include: tuple[str, ...] = field(default=())  # file stems; empty = all
    exclude: tuple[str, ...] = field(default=())  # file stems


CLASS_SPECS: dict[str, ClassSpec] = {
    "bird": ClassSpec(
        "animals/birds",
        exclude=(
            "baby-tux_alex_kuehne_01", "baby_tux_01", "baby_tux_rory_mccann_01",
            "contour_bat", "duck_yellow_ii_kurt_cagl_", "manager_mimooh_01",
            "mirjam_meijer_mirjam_mei_01", "ninja_tux_rory_mccann_01",
            "turkey_on_platter_01", "wing_mitchell_johnson_si_",
        ),
    ),
    "insect": ClassSpec(
        "animals/bugs",
        exclude=(
            "lumaca_architetto_france_01", "lumaca_turbo_architetto__01",
            "mostriciattolo2_architet_01", "mostriciattolo_architett_01",
            "ragnetto_incazzato_archi_01", "ragno_figo_architetto_fr_01",
            "spider", "virus_andreas_nilsson_01", "zanzara_cretina_architet_01",
        ),
    ),
    "mammal": ClassSpec(
        "animals/mammals",
        exclude=(
            "crazy_monkey_shandy_brow_01", "emule_icon_emule.org_01",
            "mhooo_peterm_", "shaezy_peterm_", "skoynk_peterm_",
            "squeek_peterm_", "toro_al_tramonto_archite_01",
        ),
    ),
    "house": ClassSpec(
        "buildings/homes",
        exclude=(
            "house_fudriot_omic.ch_01", "houses_jon_phillips_01",
            "lighthouse_matthew_gates_", "pinkhome3",
        ),
    ),
    "fruit": ClassSpec(
        "food/fruit",
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
    "flower": ClassSpec(
        "plants/flowers",
        exclude=(
            "cactus_linda_kim_01", "cartoon_tree_01",
            "mirjam_meijer_mirjam_mei_01", "simple_five_pettle_daff_01",
        ),
    ),
    "musical_instrument": ClassSpec(
        "recreation/music",
        include=(
            "africandrum_benji_park1", "africandrum_benji_park2",
            "africandrum_benji_park_", "bass_guitar_a.j._ashton_",
            "cello_ganson", "cello_mo_01", "cello_mo_02", "derbouk_jurgen_01",
            "djambf_ganson", "drums_jarno_vasamaa_",
            "electric_guitar_andrea__01r", "flute_ganson", "french_horn_ganson",
            "guitar_ganson", "guitar_jarno_vasamaa1", "guitar_jarno_vasamaa2",
            "guitar_profile_philippe__01", "harp1_ganson", "harp2_ganson",
            "harp3_ganson", "harp_mo_01", "maracas_ganson",
            "mountain_dulcimer_terry_", "oboe_ganson", "piano_geraint_luff_01",
            "piano_keys_jonathan_diet_01", "saxophone_jarno_vasamaa_",
            "tenor_trombone_ganson", "tpt_cubf_ganson",
            "trumpet_b_flat__ganson", "trumpet_b_flat_colour_ganso",
            "trumpet_herald__ganson", "trumpet_pocket__ganson",
            "trumpet_pocket_colour_ganso", "violin_colour_ganson",
            "violin_ganson", "violin_mo_01", "war_drum_enrique_meza_c_01",
            "war_drum_enrique_meza_c_02", "xylophone_ganson",
        ),
    ),
    "vehicle": ClassSpec(
        "transportation/vehicles",
        exclude=(
            "crossroads", "curve_ahead", "cycle_lane", "cycle_route",
            "lighthouse_01", "parking_romus_01", "quay_sign_01",
            "road_runner_ganson", "shelby_cobra_blueprint_i_01",
            "shelby_cobra_car_bluepr_", "the_mad_little_ship_core_01",
            "toy_paper_plane_01", "wing_mitchell_johnson_si_",
        ),
    ),
    "tool": ClassSpec(
        "tools",
        include=(
            "axe_peterm_", "blacksmith_anvil_ganson", "blacksmith_hammer_ganson",
            "broom_nicu_buculei_01", "brush_roller_costea_bogd_01",
            "bypasslopper_benji_park_01", "construction_hammer_jon__01",
            "cultivator_benji_park_01", "drill_peterm_", "hammer_nicu_buculei_01",
            "hammer_peterm1", "hedgeshear_benji_park_01",
            "leafrake_benji_park_01", "livella_architetto_franc_01",
            "nail_puller_peterm_", "paint_brush_costea_bogda_01",
            "paint_brush_linda_kim_01", "paint_roller_banner_gera_01",
            "paint_roller_border_gera_01", "paint_roller_gerald_g._01",
            "paint_roller_wall_gerald_01", "roundpointshovel_benji_p_01",
            "saw_peterm_", "scissors", "scissors_02", "scissors_03",
            "screwdriver_peterm_", "scrub_brush_michael_moor_",
            "simple_shovel_jeff_simps_01", "spaclu_costea_bogdan_01", "tool",
            "tools_nicu_buculei_01", "trowel_benji_park_01",
            "utensile_sega_architetto_01", "utensili_chiave_e_cacci_01",
            "wooden_mallot_benji_park_", "wrench_jarno_vasamaa_01",
        ),
    ),
    "person": ClassSpec(
        "people",
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
}

DEFAULT_CLASSES = (
    "bird,insect,mammal,house,fruit,flower,musical_instrument,vehicle,tool,person"
)


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


def flatten_on_white(im: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Return (RGB image on white, L mask of 'ink' = visible content)."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    rgb = white.convert("RGB")
    # Content = pixels that differ visibly from the white background.
    gray = rgb.convert("L")
    ink = gray.point(lambda v: 255 if v < 245 else 0)
    return rgb, ink


def convert(src: Path) -> Image.Image | None:
    """Load one clip-art file and produce the demo image, or None if unusable."""
    try:
        with Image.open(src) as im:
            im.load()
            if min(im.size) < MIN_SOURCE_SIDE:
                return None
            rgb, ink = flatten_on_white(im)
    except Exception:  # broken / unreadable file
        return None
    bbox = ink.getbbox()
    if bbox is None:
        return None  # blank
    rgb = rgb.crop(bbox)
    ink = ink.crop(bbox)
    w, h = rgb.size
    if min(w, h) < 4:
        return None
    ink_fraction = sum(ink.histogram()[255:]) / float(w * h)
    if ink_fraction < MIN_INK_FRACTION:
        return None  # near-empty (faint sketch, stray pixels)
    # Small white margin, then pad to an aspect ratio of at most 2:1.
    margin = max(1, round(0.04 * max(w, h)))
    w2, h2 = w + 2 * margin, h + 2 * margin
    if w2 > MAX_ASPECT * h2:
        h2 = int(round(w2 / MAX_ASPECT))
    elif h2 > MAX_ASPECT * w2:
        w2 = int(round(h2 / MAX_ASPECT))
    canvas = Image.new("RGB", (w2, h2), (255, 255, 255))
    canvas.paste(rgb, ((w2 - w) // 2, (h2 - h) // 2))
    scale = SHORT_SIDE / min(w2, h2)
    size = (
        min(LONG_SIDE_CAP, max(1, round(w2 * scale))),
        min(LONG_SIDE_CAP, max(1, round(h2 * scale))),
    )
    return canvas.resize(size, Image.Resampling.LANCZOS)


def candidates(root: Path, spec: ClassSpec) -> list[Path]:
    folder = root / spec.folder
    if not folder.is_dir():
        raise SystemExit(f"source folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.is_file())
    if spec.include:
        wanted = set(spec.include)
        missing = wanted - {p.stem for p in files}
        if missing:
            raise SystemExit(f"{spec.folder}: missing include files {sorted(missing)}")
        files = [p for p in files if p.stem in wanted]
    excluded = set(spec.exclude)
    return [p for p in files if p.stem not in excluded]


def evenly_spaced(n_items: int, count: int) -> list[int]:
    if count >= n_items:
        return list(range(n_items))
    return [(i * n_items) // count for i in range(count)]


def build(root: Path, out: Path, classes: list[str], count: int) -> list[tuple[str, str]]:
    version = package_version()
    rows: list[tuple[str, str, str]] = []
    summary: list[tuple[str, str]] = []
    out.mkdir(parents=True, exist_ok=True)
    for name in classes:
        spec = CLASS_SPECS[name]
        usable: list[tuple[Path, Image.Image]] = []
        for path in candidates(root, spec):
            img = convert(path)
            if img is None:
                print(f"  skip unusable {path}", file=sys.stderr)
                continue
            usable.append((path, img))
        if len(usable) < count:
            raise SystemExit(f"{name}: only {len(usable)} usable images, need {count}")
        chosen = [usable[i] for i in evenly_spaced(len(usable), count)]
        cdir = out / name
        cdir.mkdir(parents=True, exist_ok=True)
        for old in cdir.iterdir():  # make the rebuild exact
            if old.suffix in {".jpg", ".png"}:
                old.unlink()
        for i, (path, img) in enumerate(chosen):
            stem = f"{i:02d}_{slug(path.stem)}"
            if i % PNG_EVERY == 0:
                fname = stem + ".png"
                img.save(cdir / fname, format="PNG", optimize=True)
            else:
                fname = stem + ".jpg"
                img.save(cdir / fname, format="JPEG", quality=JPEG_QUALITY,
                         optimize=True)
            rows.append((f"{name}/{fname}", str(path), version))
        summary.append((name, f"{len(chosen)} of {len(usable)} usable from {spec.folder}"))
    rows.sort()
    with open(out / "SOURCES.tsv", "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write("\t".join(row) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source_root", type=Path,
                    help="png root of openclipart-png, e.g. /usr/share/openclipart/png")
    ap.add_argument("output_dir", type=Path,
                    help="output folder, e.g. cachekit/demo_data/openclipart")
    ap.add_argument("--classes", default=DEFAULT_CLASSES,
                    help=f"comma-separated class names from: {', '.join(CLASS_SPECS)}")
    ap.add_argument("--count", type=int, default=30, help="images per class")
    args = ap.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASS_SPECS]
    if unknown:
        ap.error(f"unknown classes {unknown}; known: {sorted(CLASS_SPECS)}")
    for name, info in build(args.source_root, args.output_dir, classes, args.count):
        print(f"{name}: {info}")
    total = sum(f.stat().st_size for f in args.output_dir.rglob("*") if f.is_file())
    print(f"total {total / 1e6:.2f} MB in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
