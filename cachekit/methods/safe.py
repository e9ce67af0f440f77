"""SAFE: Semantic-Aware FinE-tuning of CLIP's attention-pooling layer (arXiv 2311.04464), on cached dense maps.

A copy of the attention-pooling layer is fine-tuned on the cached dense maps of augmented train views while
everything else stays frozen; at inference the feature (or the logits) of the fine-tuned layer is blended with
the frozen one, the blend weight beta chosen on val only. The paper's body and hyper-parameters were not
reachable; the defaults follow RAFT (WideStars/RA-FT), the closest public code of the same idea. See
docs/methods-safe.md.

Everything here is pure: no files, no printing. Progress goes through an optional callback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from cachekit.attnpool import GROUPS, AttnPool
from cachekit.errors import CachekitError
from cachekit.methods.base import Estimator, Selection, accuracy, first_best
from cachekit.methods.registry import register
from cachekit.params import Config, is_int, param

CONSISTENCY_KINDS = ("l1", "kl", "none")
BLEND_MODES = ("feature", "logit")
#: Default blend grid: 0, 0.02, ..., 1 (51 values, as RAFT searches).
DEFAULT_GRID: tuple[float, ...] = tuple(i / 50 for i in range(51))


# ----------------------------------------------------------------------------------------------- config
def default_warmup(epochs: int) -> int:
    """The derived warm-up default, computed here only: min(10, epochs // 5) (RAFT: 10 of 50 epochs)."""
    return min(10, int(epochs) // 5)


@dataclass
class SafeConfig(Config):
    """SAFE's settings; training defaults follow RAFT (see docs/methods-safe.md)."""

    OWNER = "safe"

    epochs: int = param(50, "int", "training epochs over the augmented train views", ge=1)
    lr: float = param(1e-4, "float", "peak AdamW learning rate", gt=0)
    eps: float = param(1e-4, "float", "AdamW eps", gt=0)
    weight_decay: float = param(0.01, "float", "AdamW weight decay (torch's default, which RAFT uses)", ge=0)
    warmup_epochs: int | None = param(None, "int", "linear warm-up epochs; null: min(10, epochs // 5)",
                                      ge=0, optional=True)
    min_lr: float = param(1e-6, "float", "learning rate at the end of the cosine decay", ge=0)
    batch_size: int = param(64, "int", "train views per step", ge=1)
    train_groups: tuple = param(("pos", "qkv", "c_proj"), "strs", "parameter groups that train",
                                choices=tuple(GROUPS))
    logit_scale: float = param(100.0, "float", "scale of the cosine logits", gt=0)
    temperature: float = param(2.0, "float", "cross-entropy on scale*cos/temperature", gt=0)
    consistency: str = param("l1", "str", "consistency loss between fine-tuned and frozen logits",
                             choices=CONSISTENCY_KINDS)
    consistency_weight: float = param(0.5, "float", "weight of the consistency loss", ge=0)
    seed: int = param(1, "int", "seed of the shuffling")
    device: str = param("cpu", "device", "device the layer trains on (eval/sweep --device sets it)")
    blend: str = param("feature", "str", "blend fine-tuned and frozen features or logits (beta chosen on val)",
                       choices=BLEND_MODES, search=True)

    def __post_init__(self):
        if isinstance(self.train_groups, str):
            self.train_groups = (self.train_groups,)
        elif isinstance(self.train_groups, list):
            self.train_groups = tuple(self.train_groups)
        if self.warmup_epochs is None and is_int(self.epochs):
            self.warmup_epochs = default_warmup(self.epochs)

    def check(self) -> "SafeConfig":
        super().check()
        if not self.warmup_epochs <= self.epochs:
            self._fail("warmup_epochs", f"fix: use an integer between 0 and epochs ({self.epochs})")
        if self.min_lr > self.lr:
            self._fail("min_lr", "fix: use a number between 0 and lr")
        return self

    validate = check

    def fit_key(self) -> dict:
        """The settings that decide the trained layer (where it ran and how it is blended do not)."""
        d = self.to_dict()
        d.pop("device")
        d.pop("blend")
        return d


def lr_schedule(config: SafeConfig, iters_per_epoch: int) -> np.ndarray:
    """Per-iteration learning rates: linear warm-up to lr over warmup_epochs, then cosine down to min_lr."""
    total = config.epochs * iters_per_epoch
    warm = config.warmup_epochs * iters_per_epoch
    lrs = np.empty(total, dtype=np.float64)
    for i in range(total):
        if i < warm:
            lrs[i] = config.lr * (i + 1) / warm
        else:
            j, span = i - warm, total - warm
            lrs[i] = config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * j / span))
    return lrs


# ----------------------------------------------------------------------------------------------- sources
@runtime_checkable
class DenseMapSource(Protocol):
    """Anything that yields dense maps by index: ``len(source)`` and ``source.get(indices) -> (B, C, H, W)``."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> torch.Tensor: ...


class TensorSource:
    """An in-memory dense-map source over a (N, C, H, W) tensor (or numpy array)."""

    def __init__(self, tensor):
        t = tensor if isinstance(tensor, torch.Tensor) else torch.from_numpy(np.asarray(tensor))
        if t.dim() != 4 or not t.dtype.is_floating_point:
            raise CachekitError(
                f"dense maps must be a float (N, C, H, W) array, got {tuple(t.shape)} {t.dtype}; "
                "fix: pass the cached dense maps"
            )
        self.tensor = t

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """float32 maps, on the tensor's device. Maps held as float16 (the cache's dtype, half the memory) are
        widened per batch, which is exact: the same numbers as widening them all at once."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.tensor.device)
        return self.tensor[idx].float()


#: Share of a CUDA device's free memory that in-memory maps may take (the rest is the training's working memory).
DEVICE_MAPS_SHARE = 0.5


def on_device(source, device: torch.device):
    """An in-memory source moved to an accelerator once, so batches need no host-to-device copy. A source that
    streams, a CPU device, maps larger than DEVICE_MAPS_SHARE of the CUDA device's free memory, or a copy that
    fails keep the source where it is (batches are then copied one at a time, as before)."""
    if not isinstance(source, TensorSource) or device.type == "cpu" or source.tensor.device == device:
        return source
    t = source.tensor
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if t.numel() * t.element_size() > DEVICE_MAPS_SHARE * free:
            return source
    try:
        return TensorSource(t.to(device))
    except (torch.cuda.OutOfMemoryError, RuntimeError):  # also MPS, whose OOM is a plain RuntimeError
        return source


def _check_source(source, labels: torch.Tensor | None, what: str) -> None:
    if not (hasattr(source, "get") and hasattr(source, "__len__")):
        raise CachekitError(f"{what} is not a dense-map source; fix: wrap the maps in TensorSource(...)")
    if len(source) == 0:
        raise CachekitError(f"{what} is empty; fix: pass at least one dense map")
    if labels is not None and int(labels.shape[0]) != len(source):
        raise CachekitError(
            f"{what} has {len(source)} dense maps but {int(labels.shape[0])} labels; fix: pass one label per map"
        )


def _as_module(params, num_heads: int) -> AttnPool:
    if isinstance(params, AttnPool):
        return AttnPool.from_params(params.params(), params.num_heads)
    return AttnPool.from_params(params, num_heads)


@torch.no_grad()
def _pool_module(source, module: AttnPool, batch_size: int, device: torch.device) -> torch.Tensor:
    was_training = module.training
    module.eval()
    n = len(source)
    out = []
    for s in range(0, n, batch_size):
        x = source.get(np.arange(s, min(n, s + batch_size), dtype=np.int64)).to(device)
        out.append(F.normalize(module(x), dim=-1).float().cpu())
    module.train(was_training)
    return torch.cat(out, dim=0)


def pool(source, params, num_heads: int, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised pooled features (N x D, float32, on CPU) of every map in source, in batches."""
    _check_source(source, None, "source")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CachekitError(f"batch_size={batch_size!r} is invalid; fix: use an integer >= 1")
    dev = torch.device(device)
    module = _as_module(params, num_heads).to(dev)
    return _pool_module(source, module, batch_size, dev)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class SafeFit:
    """Result of :func:`fit`: fine-tuned attnpool parameters (CPU tensors), per-epoch log, config used."""

    params: dict
    log: list = field(default_factory=list)
    config: SafeConfig = field(default_factory=SafeConfig)


def _check_W(W: torch.Tensor, out_dim: int) -> None:
    if W.dim() != 2 or W.shape[1] != out_dim:
        raise CachekitError(
            f"text classifier has shape {tuple(W.shape)}, expected (C, {out_dim}); "
            "fix: pass the normalised C x D classifier of the same model"
        )


def _labels(labels, num_classes: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(labels).long()
    if y.dim() != 1:
        raise CachekitError(f"{what} must be a 1-d vector, got shape {tuple(y.shape)}; fix: pass one int per map")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise CachekitError(f"{what} must lie in 0..{num_classes - 1}; fix: check the labels against the classifier")
    return y


def loss_terms(pooled_ft: torch.Tensor, logits_frozen: torch.Tensor | None, y: torch.Tensor, W: torch.Tensor,
               config: SafeConfig):
    """SAFE's loss on one batch: CE(scale·cos(f_ft, W)/T) + weight·consistency(ft logits, frozen logits).

    Returns (logits_ft, loss, ce, consistency); consistency is "l1" (mean |diff|), "kl"
    (KL(softmax(frozen/T) || softmax(ft/T)), batch mean) or "none".
    """
    scale, temp = float(config.logit_scale), float(config.temperature)
    logits_ft = scale * F.normalize(pooled_ft, dim=-1) @ W.t()
    ce = F.cross_entropy(logits_ft / temp, y)
    if config.consistency == "none":
        cons = torch.zeros((), device=ce.device, dtype=ce.dtype)
    elif config.consistency == "l1":
        cons = (logits_ft - logits_frozen).abs().mean()
    else:
        cons = F.kl_div(F.log_softmax(logits_ft / temp, dim=-1), F.log_softmax(logits_frozen / temp, dim=-1),
                        reduction="batchmean", log_target=True)
    return logits_ft, ce + config.consistency_weight * cons, ce, cons


def fit(source, labels, W: torch.Tensor, params, num_heads: int, config: SafeConfig | None = None,
        val: tuple | None = None, callback: Callable[[dict], None] | None = None) -> SafeFit:
    """Fine-tune a copy of the attention-pooling layer on dense maps of train views.

    source: dense-map source (train views); labels: (N,) class ids; W: (C, D) L2-normalised text classifier;
    params: the original attnpool parameters (open_clip names); val: optional (source, labels) whose accuracy
    (fine-tuned layer alone) is logged per epoch. Returns the fine-tuned parameters and a per-epoch log.
    """
    config = SafeConfig() if config is None else config
    config.validate()
    dev = torch.device(config.device)
    frozen = _as_module(params, num_heads).to(dev)
    _check_W(W, frozen.c_proj.weight.shape[0])
    Wd = W.detach().to(device=dev, dtype=frozen.c_proj.weight.dtype)
    C = Wd.shape[0]
    _check_source(source, torch.as_tensor(labels), "train source")
    y_all = _labels(labels, C, "train labels").to(dev)
    if val is not None:
        val_source, val_labels = val
        _check_source(val_source, torch.as_tensor(val_labels), "val source")
        val_y = _labels(val_labels, C, "val labels")

    source = on_device(source, dev)
    if val is not None:
        val_source = on_device(val_source, dev)
    n = len(source)
    bs = config.batch_size
    iters_per_epoch = math.ceil(n / bs)
    lrs = lr_schedule(config, iters_per_epoch)
    scale = float(config.logit_scale)

    # Frozen CLIP logits of every train view, once (the layer and the maps are both fixed).
    logits_orig_all = None
    if config.consistency != "none":
        f_orig = _pool_module(source, frozen, 256, dev).to(device=dev, dtype=Wd.dtype)
        logits_orig_all = scale * f_orig @ Wd.t()

    model = _as_module(frozen.params(), num_heads).to(dev)
    model.requires_grad_(False)
    trainable = model.param_groups(config.train_groups)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=float(lrs[0]), eps=config.eps, weight_decay=config.weight_decay)

    gen = torch.Generator().manual_seed(int(config.seed))
    log: list[dict] = []
    it = 0
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).numpy()
        sums = {"loss": 0.0, "ce": 0.0, "consistency": 0.0}
        correct = 0
        for s in range(0, n, bs):
            # Sorted within the batch: cheaper for HDF5 reads; the batch loss does not depend on order.
            idx = np.sort(perm[s:s + bs])
            x = source.get(idx).to(dev)
            y = y_all[torch.as_tensor(idx, device=dev)]
            lr = float(lrs[it])
            for g in opt.param_groups:
                g["lr"] = lr
            lo = None if logits_orig_all is None else logits_orig_all[torch.as_tensor(idx, device=dev)]
            logits_ft, loss, ce, cons = loss_terms(model(x), lo, y, Wd, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = len(idx)
            sums["loss"] += float(loss.detach()) * b
            sums["ce"] += float(ce.detach()) * b
            sums["consistency"] += float(cons.detach()) * b
            correct += int((logits_ft.detach().argmax(dim=-1) == y).sum())
            it += 1
        entry = {
            "epoch": epoch + 1,
            "loss": sums["loss"] / n,
            "ce": sums["ce"] / n,
            "consistency": sums["consistency"] / n,
            "lr": lr,
            "train_acc": 100.0 * correct / n,
            "val_acc": None,
        }
        if val is not None:
            fv = _pool_module(val_source, model, 256, dev).to(Wd.dtype)
            entry["val_acc"] = accuracy(fv @ Wd.cpu().t(), val_y)
        log.append(entry)
        if callback is not None:
            callback(dict(entry))
    params_out = {k: v.cpu() for k, v in model.params().items()}
    return SafeFit(params=params_out, log=log, config=config)


# ----------------------------------------------------------------------------------------------- blending
def blend_features(f_ft: torch.Tensor, f_orig: torch.Tensor, beta: float) -> torch.Tensor:
    """normalize(beta*f_ft + (1-beta)*f_orig). The end points return the inputs unchanged (beta=0: f_orig)."""
    beta = float(beta)
    if beta == 0.0:
        return f_orig.clone()
    if beta == 1.0:
        return f_ft.clone()
    return F.normalize(beta * f_ft + (1.0 - beta) * f_orig, dim=-1)


def blend_logits(logits_ft: torch.Tensor, logits_orig: torch.Tensor, beta: float) -> torch.Tensor:
    """beta*logits_ft + (1-beta)*logits_orig. The end points return the inputs unchanged (beta=0: orig)."""
    beta = float(beta)
    if beta == 0.0:
        return logits_orig.clone()
    if beta == 1.0:
        return logits_ft.clone()
    return beta * logits_ft + (1.0 - beta) * logits_orig


def blended_logits(f_ft: torch.Tensor, f_orig: torch.Tensor, W: torch.Tensor, beta: float,
                   mode: str = "feature", logit_scale: float = 100.0) -> torch.Tensor:
    """Logits of the SAFE blend: feature mode scores the blended feature, logit mode blends the two logits."""
    if mode not in BLEND_MODES:
        raise CachekitError(f"blend mode {mode!r} is unknown; fix: use one of {', '.join(BLEND_MODES)}")
    Wt = W.to(f_orig.dtype).t()
    if mode == "feature":
        return logit_scale * blend_features(f_ft, f_orig, beta) @ Wt
    return blend_logits(logit_scale * f_ft @ Wt, logit_scale * f_orig @ Wt, beta)


def select_blend(val_f_ft: torch.Tensor, val_f_orig: torch.Tensor, val_y, W: torch.Tensor,
                 mode: str = "feature", grid: Sequence[float] | None = None,
                 test_f_ft: torch.Tensor | None = None, test_f_orig: torch.Tensor | None = None,
                 test_y=None, logit_scale: float = 100.0) -> Selection:
    """Choose beta on val only (first best over the grid), then report test accuracy once if test is given.

    Features are the L2-normalised pooled features of the fine-tuned (f_ft) and original (f_orig) layers.
    """
    if mode not in BLEND_MODES:
        raise CachekitError(f"blend mode {mode!r} is unknown; fix: use one of {', '.join(BLEND_MODES)}")
    grid = DEFAULT_GRID if grid is None else tuple(float(b) for b in grid)
    if not grid or any(not (0.0 <= b <= 1.0) for b in grid):
        raise CachekitError(f"blend grid {list(grid)} is invalid; fix: give one or more values in [0, 1]")
    if val_f_ft.shape != val_f_orig.shape:
        raise CachekitError(
            f"val features differ in shape: {tuple(val_f_ft.shape)} vs {tuple(val_f_orig.shape)}; "
            "fix: pool the same val maps with both layers"
        )
    vy = torch.as_tensor(val_y).long()
    counts = []
    for b in grid:
        lg = blended_logits(val_f_ft, val_f_orig, W, b, mode, logit_scale)
        counts.append(int((lg.argmax(dim=-1) == vy).sum()))
    best = first_best(torch.tensor(counts))
    beta = grid[best]
    n_val = int(vy.numel())
    curve = [100.0 * c / n_val for c in counts]
    frozen_val = accuracy(blended_logits(val_f_ft, val_f_orig, W, 0.0, mode, logit_scale), vy)
    extra = {"grid": list(grid), "val_curve": curve, "val_acc_frozen": frozen_val}
    test_acc = None
    if test_f_ft is not None or test_f_orig is not None or test_y is not None:
        if test_f_ft is None or test_f_orig is None or test_y is None:
            raise CachekitError("test needs test_f_ft, test_f_orig and test_y together; fix: pass all three or none")
        ty = torch.as_tensor(test_y).long()
        test_acc = accuracy(blended_logits(test_f_ft, test_f_orig, W, beta, mode, logit_scale), ty)
        extra["test_acc_frozen"] = accuracy(blended_logits(test_f_ft, test_f_orig, W, 0.0, mode, logit_scale), ty)
    return Selection(method="safe", params={"beta": beta, "mode": mode}, val_acc=curve[best],
                     test_acc=test_acc, extra=extra)


# ----------------------------------------------------------------------------------------------- estimator
class SafeEstimator(Estimator):
    """SAFE on a task: reuse the stored fit of these settings or train one (and store it), then choose the
    blend beta on val and score test once. `fit` leaves the pooled features for SAFE-A in `self.features`."""

    def fit(self, task) -> "SafeEstimator":
        from cachekit.progress import Counter

        cfg = self.config
        key = {"k": int(task.k), "seed": int(task.seed), "config": cfg.fit_key()}
        self.key = key
        params0, self.heads = task.attnpool()
        stored = task.load_fit("safe", key)
        if stored is not None:
            self.params = {n[len("params/"):]: torch.from_numpy(a) for n, a in stored["arrays"].items()
                           if n.startswith("params/")}
            self.log, self.trained, self.stored = stored["attrs"]["info"]["log"], False, None
            return self
        task.check_fit_writable()
        src, labels = task.train_dense()
        bar = Counter(task.progress, f"SAFE K={task.k} seed={task.seed}", cfg.epochs, "epoch")

        def cb(entry):
            bar.advance(loss=f"{entry['loss']:.3f}")

        res = fit(src, labels, task.W.cpu(), params0, self.heads, cfg, val=(task.dense("val"), task.val_y.cpu()),
                  callback=cb)
        bar.close()
        self.params, self.log, self.trained = res.params, res.log, True
        arrays = {f"params/{n}": t.detach().cpu().numpy() for n, t in self.params.items()}
        info = {"log": self.log, "heads": self.heads}
        path = task.save_fit("safe", key, arrays, info)
        self.stored = str(path) if path else None
        return self

    def pooled(self, task, split: str) -> torch.Tensor:
        """L2-normalised features of a split pooled by the fine-tuned layer."""
        return pool(task.dense(split), self.params, self.heads, device=self.config.device)

    def select(self, task) -> Selection:
        W = task.W.cpu()
        f_ft_val, f_orig_val = self.pooled(task, "val"), task.val_f.cpu()
        if task.val_is_test:
            f_ft_test, f_orig_test = f_ft_val, f_orig_val
        else:
            f_ft_test, f_orig_test = self.pooled(task, "test"), task.test_f.cpu()
        self.features = {"val": (f_ft_val, f_orig_val), "test": (f_ft_test, f_orig_test)}
        self.selection = select_blend(f_ft_val, f_orig_val, task.val_y.cpu(), W, mode=self.config.blend,
                                      test_f_ft=f_ft_test, test_f_orig=f_orig_test, test_y=task.test_y.cpu())
        return self.selection

    def blended(self, split: str) -> torch.Tensor:
        """Features of a split with the beta chosen on val (feature blending; SAFE-A's inputs)."""
        f_ft, f_orig = self.features[split]
        return blend_features(f_ft, f_orig, self.selection.params["beta"])

    def extra(self) -> dict:
        sel = self.selection
        return {"trained": self.trained, "val_acc_frozen": sel.extra["val_acc_frozen"],
                "test_acc_frozen": sel.extra.get("test_acc_frozen"),
                "final_train_loss": self.log[-1]["loss"] if self.log else None, "log": self.log,
                **({"stored": self.stored} if self.stored else {})}


register("safe", config=SafeConfig, estimator=SafeEstimator, trained=True, doc="docs/methods-safe.md",
         summary="fine-tune the attention-pooling layer on cached dense maps, blend with the frozen one")
