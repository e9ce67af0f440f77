"""The demo: extract -> refine -> evaluate every method -> report, on the embedded clip-art images."""
from __future__ import annotations

import json
from pathlib import Path

from .cache import open_cache
from .extract import ExtractOptions, extract
from .report import build_report
from .runner import evaluate, store_refine

DEMO_DATA = Path(__file__).parent / "demo_data" / "openclipart"
DEMO_METHODS = ("zeroshot", "tip", "ape", "gda", "tipf", "apet", "safe", "safe-a")
# Short training so the demo stays a demo on two CPU cores.
DEMO_OVERRIDES = {"tipf": {"epochs": 5}, "apet": {"epochs": 5}, "safe": {"epochs": 10, "warmup_epochs": 2},
                  "safe-a": {"safe": {"epochs": 10, "warmup_epochs": 2}, "adapter_config": {"epochs": 5}}}


def run_demo(out_dir="cache/demo", model="RN-tiny", pretrained=None, shots=(1, 2, 4, 8), seeds=(1, 2, 3),
             views=10, methods=DEMO_METHODS, progress=True, workers=0, device="cpu") -> dict:
    out_dir = Path(out_dir)
    cache_path = out_dir / "demo.h5"
    ex = extract(ExtractOptions(data=str(DEMO_DATA), out=str(cache_path), model=model, pretrained=pretrained,
                                shots=tuple(shots), seeds=tuple(seeds), views=views, batch_size=32,
                                workers=workers, device=device, progress=progress))
    with open_cache(cache_path) as c:
        q = max(1, c.embed_dim // 2)
        ref = store_refine(c, max(c.shots), c.seeds[0], q)
        over = {**DEMO_OVERRIDES, "ape": {"top_k": q}, "apet": {**DEMO_OVERRIDES["apet"], "top_k": q}}
        records = evaluate(c, list(methods), overrides=over, progress=progress)
        weights = c.weights_label
    results = out_dir / "results.jsonl"
    with open(results, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    rep = build_report(records, out_dir / "report")
    return {"cache": str(cache_path), "extract": ex, "refine": {k: ref[k] for k in ("k", "seed", "top_k", "stored")},
            "results": str(results), "report": rep, "records": records, "weights": weights}
