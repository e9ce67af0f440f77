"""Build a ResNet CLIP with open_clip, from a local checkpoint or a seeded random init.

Nothing here ever downloads: `pretrained` must be an existing local file, and it is never handed
to open_clip as a tag (open_clip would resolve a tag before a path).
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CachekitError

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

RESNET_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
TINY_MODELS = ("RN-tiny", "RN-tiny-224")

# Keys a TorchScript OpenAI archive carries that are not model parameters.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def register_tiny_configs():
    """Register the shipped tiny ResNet configs with open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    for path in sorted(_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
    _registered = True


def available_models() -> list[str]:
    """Every open_clip model name that has a ResNet (attention-pooling) visual tower."""
    import open_clip

    register_tiny_configs()
    out = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        if isinstance(cfg.get("vision_cfg", {}).get("layers"), (list, tuple)):
            out.append(name)
    return out


def sha256_file(path, chunk=1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


#: Checkpoints cachekit ships, by sha256: what outputs call them (docs/mini-clip.md).
KNOWN_CHECKPOINTS = {
    "d3028517bbe64ee02d4e93bab9a1f7732583ed7121b88b383d4bf4fb950bba02":
        "cachekit mini-CLIP trained on Open Clip Art (not OpenAI CLIP)",
}


@dataclass
class ModelBundle:
    """A model plus everything about it that goes into a cache's provenance."""

    model: torch.nn.Module
    name: str
    checkpoint: str  # "random" or the checkpoint's file name
    checkpoint_sha256: str  # "random" or sha256 hex
    init_seed: int
    preprocess_cfg: dict
    tokenizer: object = field(repr=False, default=None)

    @property
    def random_weights(self) -> bool:
        return self.checkpoint_sha256 == "random"

    @property
    def weights_label(self) -> str:
        if self.random_weights:
            return f"random weights (seed {self.init_seed}), not pretrained: accuracies are not meaningful"
        name = KNOWN_CHECKPOINTS.get(self.checkpoint_sha256)
        return (f"{name + ': ' if name else ''}pretrained checkpoint {self.checkpoint} "
                f"(sha256 {self.checkpoint_sha256[:12]})")

    @property
    def visual(self):
        return self.model.visual

    @property
    def image_size(self) -> int:
        return int(self.preprocess_cfg["size"] if isinstance(self.preprocess_cfg["size"], int)
                   else self.preprocess_cfg["size"][0])


def _read_checkpoint(path: Path) -> dict:
    """State dict from an OpenAI TorchScript archive or a torch.save'd (wrapped) state dict."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.load's deprecation notice
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        for k in _JIT_EXTRA_KEYS:
            sd.pop(k, None)
        return dict(sd)
    except Exception:
        pass  # not TorchScript: try a plain state dict below
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CachekitError(
            f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "fix: pass an OpenAI .pt archive or an open_clip state dict saved with torch.save"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CachekitError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict; "
                            "fix: pass an OpenAI .pt archive or an open_clip state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_model(name: str, pretrained: str | os.PathLike | None = None, init_seed: int = 0,
               device: str = "cpu") -> ModelBundle:
    """Build `name` (a ResNet CLIP) on `device`, in eval mode, fp32.

    With `pretrained` (a local file) its weights are loaded strictly; without, the weights are a
    random init seeded by `init_seed`, and the bundle says so.
    """
    import open_clip

    register_tiny_configs()
    models = available_models()
    if name not in models:
        raise CachekitError(f"unknown model {name!r}; fix: use a ResNet CLIP, one of {', '.join(models)}")

    ckpt_name, ckpt_sha, sd = "random", "random", None
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CachekitError(f"checkpoint {pretrained} is not a file; fix: give the path of a local "
                                "checkpoint (cachekit never downloads weights)")
        path = path.resolve()
        ckpt_name, ckpt_sha = path.name, sha256_file(path)
        sd = _read_checkpoint(path)

    # OpenAI archives use QuickGELU in the text tower; the image tower (ReLU) is unaffected.
    arch = name
    if sd is not None and not name.endswith("-quickgelu") and f"{name}-quickgelu" in models:
        arch = f"{name}-quickgelu"

    logging.getLogger().disabled, prev = True, logging.getLogger().disabled
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.getLogger().disabled = prev

    if sd is not None:
        # Archives (e.g. traced/scripted ones) may also carry the model's non-persistent buffers.
        own = set(model.state_dict())
        buffers = {name for name, _ in model.named_buffers()}
        sd = {k: v for k, v in sd.items() if k in own or k not in buffers}
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        problem = None
        if missing or unexpected:
            problem = (f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) "
                       f"{unexpected[:3]}")
        else:
            try:
                model.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                problem = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        if problem:
            raise CachekitError(f"checkpoint {pretrained} does not fit model {name}: {problem}; "
                                "fix: pass --model matching the checkpoint's architecture") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    pre = dict(open_clip.get_model_preprocess_cfg(model))
    for k, v in list(pre.items()):
        if isinstance(v, tuple):
            pre[k] = list(v)
    return ModelBundle(model=model, name=name, checkpoint=ckpt_name, checkpoint_sha256=ckpt_sha,
                       init_seed=init_seed, preprocess_cfg=pre, tokenizer=open_clip.get_tokenizer(arch))


def dense_and_pooled(visual, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The map entering `visual.attnpool` and its output; identical to `encode_image(x)`."""
    dense = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    return dense, visual.attnpool(dense)


def attnpool_params(visual) -> tuple[dict[str, torch.Tensor], int]:
    """The attention-pooling layer's parameters (open_clip names) and its head count."""
    ap = visual.attnpool
    return {k: v.detach().float().cpu().clone() for k, v in ap.state_dict().items()}, int(ap.num_heads)


def encode_templates(bundle: ModelBundle, classnames: list[str], templates: list[str],
                     device: str = "cpu") -> tuple[torch.Tensor, int]:
    """Per-template class embeddings (T, C, D), each row L2-normalised, and the count of prompts
    the tokenizer truncated (open_clip truncates silently at 77 tokens)."""
    tok = bundle.tokenizer
    ctx = getattr(tok, "context_length", 77)
    out, truncated = [], 0
    with torch.inference_mode():
        for t in templates:
            prompts = [t.format(c) for c in classnames]
            ids = tok(prompts)
            truncated += int((ids[:, -1] != 0).sum().item()) if ids.shape[1] == ctx else 0
            emb = bundle.model.encode_text(ids.to(device)).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.stack(out), truncated


def text_classifier(embeddings: torch.Tensor) -> torch.Tensor:
    """Average the per-template embeddings (T, C, D) per class, then L2-normalise: (C, D)."""
    return torch.nn.functional.normalize(embeddings.mean(dim=0), dim=-1)
