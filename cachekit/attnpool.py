"""CLIP ResNet attention pooling, written on plain tensors.

The layer (open_clip's ``AttentionPool2d``) maps a dense map x (B, C_in, H, W) to a pooled feature (B, D):

1. flatten the map into HW tokens, prepend their mean as token 0, add ``positional_embedding``
   ((HW+1) x C_in);
2. multi-head attention with separate q/k/v projections (Linear C_in -> C_in, with bias) over all HW+1
   tokens, then the output projection ``c_proj`` (Linear C_in -> D);
3. return token 0.

Because only token 0 is returned and every attention row depends on its own query only, the layer equals
attention with the single query of token 0 (keys and values over all HW+1 tokens). ``attnpool_full`` is
the literal layer (all queries), kept for verification; ``attnpool_single_query`` is what SAFE trains and
what verification compares against open_clip.

Parameters use open_clip's names, so a dict from ``model.visual.attnpool.state_dict()`` (or the cache's
stored attnpool weights) can be passed directly; ``num_heads`` is passed separately.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from cachekit.errors import CachekitError

#: Parameter names, in open_clip's ``state_dict()`` order.
PARAM_NAMES: tuple[str, ...] = (
    "positional_embedding",
    "k_proj.weight",
    "k_proj.bias",
    "q_proj.weight",
    "q_proj.bias",
    "v_proj.weight",
    "v_proj.bias",
    "c_proj.weight",
    "c_proj.bias",
)

#: Trainable groups and the parameters each one holds.
GROUPS: dict[str, tuple[str, ...]] = {
    "pos": ("positional_embedding",),
    "qkv": ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"),
    "c_proj": ("c_proj.weight", "c_proj.bias"),
}


def _check_params(params: Mapping[str, torch.Tensor], num_heads: int) -> None:
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise CachekitError(
            f"attnpool parameters are missing {', '.join(missing)}; fix: pass a dict with keys "
            f"{', '.join(PARAM_NAMES)} (open_clip's visual.attnpool.state_dict() names)"
        )
    c_in = params["q_proj.weight"].shape[-1]
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise CachekitError(f"num_heads must be a positive integer, got {num_heads!r}; fix: pass e.g. 32 for RN50")
    if c_in % int(num_heads) != 0:
        raise CachekitError(
            f"num_heads={num_heads} does not divide the attnpool input width {c_in}; "
            "fix: pass the model's head count (RN50: 32)"
        )
    expect = {
        "k_proj.weight": (c_in, c_in), "q_proj.weight": (c_in, c_in), "v_proj.weight": (c_in, c_in),
        "k_proj.bias": (c_in,), "q_proj.bias": (c_in,), "v_proj.bias": (c_in,),
    }
    for name, shape in expect.items():
        if tuple(params[name].shape) != shape:
            raise CachekitError(
                f"attnpool parameter {name} has shape {tuple(params[name].shape)}, expected {shape}; "
                "fix: pass the weights of one attention-pooling layer"
            )
    pos = params["positional_embedding"]
    if pos.dim() != 2 or pos.shape[1] != c_in:
        raise CachekitError(
            f"positional_embedding has shape {tuple(pos.shape)}, expected (HW+1, {c_in}); "
            "fix: pass the weights of one attention-pooling layer"
        )
    cw, cb = params["c_proj.weight"], params["c_proj.bias"]
    if cw.dim() != 2 or cw.shape[1] != c_in or tuple(cb.shape) != (cw.shape[0],):
        raise CachekitError(
            f"c_proj has weight {tuple(cw.shape)} and bias {tuple(cb.shape)}, expected (D, {c_in}) and (D,); "
            "fix: pass the weights of one attention-pooling layer"
        )


def _as_tensors(params: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {k: (torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v)
            for k, v in params.items() if k in PARAM_NAMES}


def tokens(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Dense map (B, C, H, W) -> tokens (B, HW+1, C): the mean token first, positional embedding added."""
    if x.dim() != 4:
        raise CachekitError(f"dense map must be (B, C, H, W), got shape {tuple(x.shape)}; fix: pass a 4-d batch")
    b, c, h, w = x.shape
    if tuple(pos.shape) != (h * w + 1, c):
        raise CachekitError(
            f"positional_embedding {tuple(pos.shape)} does not fit a {c}x{h}x{w} dense map "
            f"(expected ({h * w + 1}, {c})); fix: use the attnpool weights of the model that produced the map"
        )
    t = x.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)  # (B, HW+1, C)
    return t + pos.to(t.dtype).unsqueeze(0)


def _prepare(x: torch.Tensor, params: Mapping[str, object], num_heads: int):
    p = _as_tensors(params)
    _check_params(p, num_heads)
    dtype = p["q_proj.weight"].dtype
    if not dtype.is_floating_point:
        raise CachekitError(f"attnpool weights must be floating point, got {dtype}; fix: cast them to float32")
    x = x.to(dtype)
    return x, p, int(num_heads)


def _linear(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(t, w.t()) + b


def _attend(q: torch.Tensor, t: torch.Tensor, p: Mapping[str, torch.Tensor], num_heads: int) -> torch.Tensor:
    """Multi-head attention of queries q (B, Q, C) over tokens t (B, T, C) -> (B, Q, D) after c_proj."""
    b, nq, c = q.shape
    nt = t.shape[1]
    hd = c // num_heads
    k = _linear(t, p["k_proj.weight"], p["k_proj.bias"])
    v = _linear(t, p["v_proj.weight"], p["v_proj.bias"])
    qh = q.reshape(b, nq, num_heads, hd).transpose(1, 2)  # (B, h, Q, hd)
    kh = k.reshape(b, nt, num_heads, hd).transpose(1, 2)  # (B, h, T, hd)
    vh = v.reshape(b, nt, num_heads, hd).transpose(1, 2)  # (B, h, T, hd)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(hd)  # (B, h, Q, T)
    attn = torch.softmax(scores, dim=-1)
    out = torch.matmul(attn, vh)  # (B, h, Q, hd)
    out = out.transpose(1, 2).reshape(b, nq, c)
    return _linear(out, p["c_proj.weight"], p["c_proj.bias"])


def attnpool_full(x: torch.Tensor, params: Mapping[str, object], num_heads: int) -> torch.Tensor:
    """The literal layer: attention for all HW+1 queries, then token 0 is returned. (B, C, H, W) -> (B, D)."""
    x, p, h = _prepare(x, params, num_heads)
    t = tokens(x, p["positional_embedding"])
    q = _linear(t, p["q_proj.weight"], p["q_proj.bias"])
    return _attend(q, t, p, h)[:, 0]


def attnpool_single_query(x: torch.Tensor, params: Mapping[str, object], num_heads: int) -> torch.Tensor:
    """Same result as :func:`attnpool_full`, computing only the token-0 query. (B, C, H, W) -> (B, D)."""
    x, p, h = _prepare(x, params, num_heads)
    t = tokens(x, p["positional_embedding"])
    q = _linear(t[:, :1], p["q_proj.weight"], p["q_proj.bias"])
    return _attend(q, t, p, h)[:, 0]


def attention_map(x: torch.Tensor, params: Mapping[str, object], num_heads: int) -> torch.Tensor:
    """Where the pooled feature looks: token 0's attention weights over the HW spatial tokens, averaged over
    heads, as (B, H, W). The weight token 0 gives itself (the mean token) is left out, so a row sums to < 1."""
    x, p, h = _prepare(x, params, num_heads)
    b, c, hh, ww = x.shape
    t = tokens(x, p["positional_embedding"])
    q = _linear(t[:, :1], p["q_proj.weight"], p["q_proj.bias"])
    k = _linear(t, p["k_proj.weight"], p["k_proj.bias"])
    hd = c // h
    qh = q.reshape(b, 1, h, hd).transpose(1, 2)
    kh = k.reshape(b, -1, h, hd).transpose(1, 2)
    attn = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(hd), dim=-1)  # (B, h, 1, T)
    return attn.mean(dim=1)[:, 0, 1:].reshape(b, hh, ww)


class AttnPool(nn.Module):
    """A trainable attention-pooling layer with open_clip's parameter names (single-query forward)."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, num_heads: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_dim % num_heads != 0:
            raise CachekitError(
                f"num_heads={num_heads} does not divide the attnpool input width {in_dim}; "
                "fix: pass the model's head count (RN50: 32)"
            )
        # Same registration order as open_clip, so state_dict() keys come out in the same order.
        self.positional_embedding = nn.Parameter(torch.zeros(num_tokens, in_dim, dtype=dtype))
        self.k_proj = nn.Linear(in_dim, in_dim, dtype=dtype)
        self.q_proj = nn.Linear(in_dim, in_dim, dtype=dtype)
        self.v_proj = nn.Linear(in_dim, in_dim, dtype=dtype)
        self.c_proj = nn.Linear(in_dim, out_dim, dtype=dtype)
        self.num_heads = int(num_heads)

    @classmethod
    def from_params(cls, params: Mapping[str, object], num_heads: int,
                    dtype: torch.dtype = torch.float32) -> "AttnPool":
        """Build from a dict of tensors or numpy arrays (open_clip names); values are copied and cast to dtype."""
        p = _as_tensors(params)
        _check_params(p, num_heads)
        pos, cw = p["positional_embedding"], p["c_proj.weight"]
        mod = cls(pos.shape[0], pos.shape[1], cw.shape[0], int(num_heads), dtype=dtype)
        with torch.no_grad():
            for name, prm in mod.named_parameters():
                prm.copy_(p[name].to(dtype))
        return mod

    def _live(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._live()
        x = x.to(self.positional_embedding.dtype)
        t = tokens(x, p["positional_embedding"])
        q = _linear(t[:, :1], p["q_proj.weight"], p["q_proj.bias"])
        return _attend(q, t, p, self.num_heads)[:, 0]

    def params(self) -> dict[str, torch.Tensor]:
        """Detached clones of the parameters, keyed by open_clip's names."""
        return {name: prm.detach().clone() for name, prm in self.named_parameters()}

    def param_groups(self, names: Iterable[str] | str) -> list[nn.Parameter]:
        """Parameters of the named groups ("pos", "qkv", "c_proj"), in a fixed order, without duplicates."""
        if isinstance(names, str):
            names = (names,)
        names = list(names)
        unknown = [n for n in names if n not in GROUPS]
        if unknown:
            raise CachekitError(
                f"unknown attnpool parameter group(s) {', '.join(map(repr, unknown))}; "
                f"fix: choose among {', '.join(GROUPS)}"
            )
        live = self._live()
        wanted = {pn for g in names for pn in GROUPS[g]}
        return [live[pn] for pn in PARAM_NAMES if pn in wanted]
