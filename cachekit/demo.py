"""The demo: extract -> refine -> evaluate every method -> report, on the embedded clip-art images."""
from __future__ import annotations

from pathlib import Path

from .cache import open_cache
from .extraction import ExtractOptions, extract
from .progress import Progress
from .records import read_results
from .report import build_report
from .runner import Runner, evaluate, refine_stored

DEMO_DATA = Path(__file__).parent / "demo_data" / "openclipart"
#: The project's own small CLIP, pretrained on Open Clip Art with the demo images held out (docs/mini-clip.md).
MINI_CLIP = "mini-clip"
MINI_CLIP_CHECKPOINT = Path(__file__).parent / "weights" / "mini-clip-openclipart.pt"
DEMO_METHODS = ("zeroshot", "tip", "ape", "gda", "tipf", "apet", "safe", "safe-a")
# Short training so the demo stays a demo on two CPU cores.
DEMO_OVERRIDES = {"tipf": {"epochs": 5}, "apet": {"epochs": 5}, "safe": {"epochs": 10},
                  "safe-a": {"safe": {"epochs": 10}, "adapter_config": {"epochs": 5}}}


def run_demo(out_dir="cache/demo", model=MINI_CLIP, pretrained=None, shots=(1, 2, 4, 8), seeds=(1, 2, 3),
             views=10, methods=DEMO_METHODS, progress: Progress | None = None, workers=0, device="cpu") -> dict:
    """The mini-CLIP with its shipped checkpoint by default; another model without --pretrained runs with
    seeded random weights (and every output says so)."""
    out_dir = Path(out_dir)
    if model == MINI_CLIP and pretrained is None:
        pretrained = str(MINI_CLIP_CHECKPOINT)
    cache_path = out_dir / "demo.h5"
    ex = extract(ExtractOptions(data=str(DEMO_DATA), out=str(cache_path), model=model, pretrained=pretrained,
                                shots=tuple(shots), seeds=tuple(seeds), views=views, batch_size=32,
                                workers=workers, device=device, progress=progress))
    results = out_dir / "results.jsonl"
    with open_cache(cache_path) as c:
        q = max(1, c.embed_dim // 2)
        ref = refine_stored(c, q)  # every few-shot set; eval's APE picks these up (channels=auto)
        runner = Runner(c, device=device, progress=progress)
        # APE-T's text-only refinement is not the stored one: give it the same Q (its default 500 would be clipped).
        overrides = {**DEMO_OVERRIDES, "apet": {**DEMO_OVERRIDES["apet"], "top_k": q}}
        records = evaluate(c, list(methods), overrides=overrides, progress=progress, out=results, runner=runner)
        weights = c.weights_label
        build = runner.build
    # The report covers this build of the demo cache only (results of an earlier build stay in the file).
    rep = build_report([r for r in read_results(results).records if r["cache_build"] == build], out_dir / "report")
    return {"cache": str(cache_path), "extract": ex, "refine": {"top_k": ref[0]["top_k"], "sets": len(ref)},
            "results": str(results), "report": rep, "records": records, "weights": weights}
