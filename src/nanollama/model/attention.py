"""Attention backends behind one function, `attend`, so masks and kernels can grow in one place.

A mask is a name in `MASK_MODS` (a FlexAttention `mask_mod`) or `None` for bidirectional attention.
`sdpa` runs `causal` through its built-in `is_causal` path and any other named mask as a dense boolean
mask made from the same `mask_mod`; `flex` turns it into a BlockMask. New static masks (sliding
window, prefix-LM) are one entry in `MASK_MODS`; data-dependent ones (document masks) will need their
mask passed in rather than cached by length.
"""

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

BACKENDS = ("sdpa", "flex")

# Eager flex (CPU) materialises the score matrix instead of fusing: fine at the sizes CPU runs use.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


MASK_MODS = {"causal": causal_mask}

_MASKS: dict[tuple, BlockMask | Tensor] = {}


def cached_mask(mask: str, seq_len: int, device: torch.device, block: bool) -> BlockMask | Tensor:
    """A BlockMask (flex) or dense (T, T) boolean mask (sdpa), built once per (mask, length, device).

    A plain dict rather than lru_cache or a compiler-disabled function, so torch.compile reads it
    without a graph break: the first compiled call builds and stores the mask, costing one recompile
    (guarded on the key); later compiled steps reuse the cached mask.
    """
    key = (mask, seq_len, torch.device(device), block)
    if key not in _MASKS:
        make = create_block_mask if block else create_mask
        _MASKS[key] = make(MASK_MODS[mask], None, None, seq_len, seq_len, device=device)
    return _MASKS[key]


def flex_backward_available(device: torch.device | str) -> bool:
    """Whether flex attention can be trained on `device`: torch has no CPU backward for it (GPU only)."""
    return torch.device(device).type == "cuda"


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: str | None, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, T, d) and k, v (B, H_kv, T, d); H_kv divides H (GQA)."""
    gqa, seq_len = k.shape[1] != q.shape[1], q.shape[2]
    if backend == "sdpa":
        if mask is None or mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=gqa)
        attn_mask = cached_mask(mask, seq_len, q.device, block=False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    if backend == "flex":
        block_mask = None if mask is None else cached_mask(mask, seq_len, q.device, block=True)
        # Inside a compiled model flex_attention is traced and fused as is; eager on GPU it must be
        # compiled on its own; eager on CPU it runs unfused (compiling it there is slow and optional).
        eager_gpu = q.is_cuda and not torch.compiler.is_compiling()
        flex = _compiled_flex_attention() if eager_gpu else flex_attention
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    raise ValueError(f"unknown attention backend {backend!r} (expected one of {BACKENDS})")
