"""The training loop shared by the trained cache adapters, Tip-Adapter-F and APE-T
(docs/methods-trained-adapters.md): per-iteration cosine learning rate, AdamW, seeded shuffling, the epoch
chosen on val only, and the input checks both trainers share.

Pure tensor functions: no files, no printing; progress goes through an optional callback.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as TF

from ..errors import CachekitError


# ----------------------------------------------------------------------------------------------- checks
def _labels(y, C: int, n: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.numel() != n:
        raise CachekitError(f"{what} has shape {tuple(y.shape)}, expected ({n},); fix: pass one label per row")
    if y.is_floating_point():
        raise CachekitError(f"{what} must be integer class ids, got {y.dtype}; fix: pass a long tensor")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= C):
        raise CachekitError(f"{what} must lie in 0..{C - 1}; fix: use 0-based labels matching the rows of W")
    return y


def check_inputs(X, y, W, F, L, val_f, val_y) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape/label checks shared by both trainers; returns (train labels, val labels) as long tensors."""
    if W.dim() != 2:
        raise CachekitError(f"text classifier has shape {tuple(W.shape)}; fix: pass W as (C, D)")
    C, D = W.shape
    for name, t in (("train views X", X), ("cache keys F", F), ("val features", val_f)):
        if t.dim() != 2 or t.shape[1] != D:
            raise CachekitError(f"{name} has shape {tuple(t.shape)}, expected (*, {D}); "
                                "fix: pass features of the same model as W")
    if X.shape[0] == 0 or F.shape[0] == 0 or val_f.shape[0] == 0:
        raise CachekitError("train views, cache keys and val features must be non-empty; "
                            "fix: pass at least one row each")
    if L.dim() != 2 or tuple(L.shape) != (F.shape[0], C):
        raise CachekitError(f"cache values L have shape {tuple(L.shape)}, expected ({F.shape[0]}, {C}); "
                            "fix: pass L = one_hot(key_labels, C) as float")
    for name, t in (("X", X), ("W", W), ("F", F), ("L", L), ("val_f", val_f)):
        if not t.is_floating_point():
            raise CachekitError(f"{name} must be a float tensor, got {t.dtype}; fix: pass float32 features")
    return _labels(y, C, X.shape[0], "train labels"), _labels(val_y, C, val_f.shape[0], "val labels")


# ----------------------------------------------------------------------------------------------- training
def cosine_lr(lr: float, it: int, total: int) -> float:
    """Learning rate of iteration `it` (0-based) of `total`: lr * (1 + cos(pi * it / total)) / 2.

    The closed form of torch's CosineAnnealingLR(T_max=total, eta_min=0) stepped once per iteration.
    """
    return 0.5 * lr * (1.0 + math.cos(math.pi * it / total))


def train_loop(params: Sequence[torch.Tensor], batch_logits: Callable[[torch.Tensor], torch.Tensor],
               y: torch.Tensor, val_correct: Callable[[], int], n_val: int,
               snapshot: Callable[[], object], config, callback=None) -> tuple[object, int, list, float]:
    """Shared epoch loop of Tip-F and APE-T.

    batch_logits(rows) -> (B, C) logits of the train rows `rows` (a LongTensor on the device);
    val_correct() -> number of correct val predictions with the current parameters and the init (alpha, beta);
    snapshot() -> a detached copy of the current parameters.
    Returns (snapshot of the first best epoch on val, best epoch (1-based), per-epoch log, val acc before
    training). The epoch is chosen on val only; nothing here can see test data.
    """
    dev = y.device
    n = int(y.numel())
    per_epoch = n if config.epoch_size is None else min(int(config.epoch_size), n)
    bs = int(config.batch_size)
    iters = math.ceil(per_epoch / bs)
    total = config.epochs * iters
    opt = torch.optim.AdamW(list(params), lr=float(config.lr), eps=float(config.eps),
                            weight_decay=float(config.weight_decay))
    gen = torch.Generator().manual_seed(int(config.seed))
    with torch.no_grad():
        val_init = 100.0 * val_correct() / n_val
    best, best_epoch, best_state = -1, 0, None
    log: list[dict] = []
    it = 0
    lr = float(config.lr)
    for epoch in range(1, config.epochs + 1):
        perm = torch.randperm(n, generator=gen)[:per_epoch].to(dev)
        loss_sum, correct = 0.0, 0
        for s in range(0, per_epoch, bs):
            rows = perm[s:s + bs]
            lr = cosine_lr(float(config.lr), it, total)
            for g in opt.param_groups:
                g["lr"] = lr
            out = batch_logits(rows)
            yb = y[rows]
            loss = TF.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * rows.numel()
            correct += int((out.detach().argmax(dim=-1) == yb).sum())
            it += 1
        with torch.no_grad():
            val_ok = int(val_correct())
        entry = {"epoch": epoch, "loss": loss_sum / per_epoch, "train_acc": 100.0 * correct / per_epoch,
                 "val_acc": 100.0 * val_ok / n_val, "lr": lr}
        if val_ok > best:  # strictly better: the first best epoch wins ties
            best, best_epoch, best_state = val_ok, epoch, snapshot()
        log.append(entry)
        if callback is not None:
            callback(dict(entry))
    return best_state, best_epoch, log, val_init
