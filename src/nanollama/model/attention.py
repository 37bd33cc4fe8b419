"""Attention backends behind one function, `attend`, and the masks they share.

Every mask is a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` written with elementwise tensor
ops, so the same function serves both backends: flex turns it into a BlockMask (vmap over blocks), sdpa
into a dense boolean mask (plain broadcasting over (B, 1, Q, KV) index grids).

Two kinds of masks reach `attend`:
- static ones, named by a string (`causal`, `sliding_window:W`, or any name in `MASK_MODS`) or `None`
  (bidirectional): they depend only on the sequence length, so they are built once per
  (mask, length, device) and cached (`cached_mask`); sdpa runs `causal` through its `is_causal` path;
- data-dependent ones (documents of packed sequences, prefix-LM prefixes, the key-padding and offsets of
  a KV cache): built once per batch by `build_mask` (a BlockMask for flex, a (B, 1, Q, KV) boolean
  tensor for sdpa), shared by all layers, and passed to `attend` as such.
"""

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("sdpa", "flex")
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Mask = str | None | BlockMask | Tensor  # static name, bidirectional, or built for a batch (flex, sdpa)

# A dense boolean mask beyond this many elements (B * Q * KV) is refused rather than allocated.
MAX_DENSE_MASK = 2**28

# Eager flex (CPU) materialises the score matrix instead of fusing: fine at the sizes CPU runs use.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


# ------------------------------------------------------------------------------------------ mask_mods


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def sliding_window_mask(window: int) -> MaskMod:
    """Causal attention to the `window` most recent positions, the query's own included."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mask_mod


def document_mask(doc_ids: Tensor, base: MaskMod | None) -> MaskMod:
    """`base` (None: bidirectional) within documents only; doc_ids (B, T) labels each token of a packed row.

    Positions need not restart at each document: RoPE scores depend only on q - kv, so a document sees
    the same attention wherever it sits in the row.
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        return same if base is None else same & base(b, h, q_idx, kv_idx)

    return mask_mod


def prefix_lm_mask(prefix_len: Tensor, base: MaskMod) -> MaskMod:
    """`base` (causal) plus full attention to the first prefix_len[b] positions of row b: the prefix
    (e.g. image patches, a prompt) is read bidirectionally, the rest is generated causally."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < prefix_len[b]) | base(b, h, q_idx, kv_idx)

    return mask_mod


def cache_mask(start: Tensor, slots: Tensor, base: MaskMod) -> MaskMod:
    """Queries in cache slots `slots` (T,) against every slot of a KV cache whose row b holds padding
    before slot start[b]: `base` in each row's own positions (slot - start), padding never attended.

    A padding query attends to itself alone, so that no row is fully masked (sdpa would give NaN, and
    NaN times a zero attention weight stays NaN in the next layer).
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_slot, first = slots[q_idx], start[b]
        real = (kv_idx >= first) & base(b, h, q_slot - first, kv_idx - first)
        return real | (kv_idx == q_slot)

    return mask_mod


MASK_MODS: dict[str, MaskMod] = {"causal": causal_mask}


def static_mask(causal: bool, sliding_window: int = 0) -> str | None:
    """The name of a model's static mask: None (bidirectional), `causal` or `sliding_window:W`."""
    if not causal:
        return None
    return f"sliding_window:{sliding_window}" if sliding_window > 0 else "causal"


def get_mask_mod(mask: str) -> MaskMod:
    """The mask_mod of a static mask name (see `static_mask`)."""
    name, _, window = mask.partition(":")
    if name == "sliding_window" and window:
        return sliding_window_mask(int(window))
    return MASK_MODS[mask]


# ----------------------------------------------------------------------------------------- built masks


def dense_mask_error(B: int, Q: int, KV: int) -> str:
    """Why a dense (B, 1, Q, KV) mask is refused, '' if it is not."""
    if B * Q * KV <= MAX_DENSE_MASK:
        return ""
    return (
        f"dense attention mask of batch {B} x {Q} queries x {KV} keys = {B * Q * KV:,} elements is over "
        f"the limit of {MAX_DENSE_MASK:,}: use attention=flex (on GPU), a smaller batch or shorter rows"
    )


def batch_mask_error(backend: str, device_type: str, B: int, T: int) -> str:
    """Why the per-batch masks (documents, padding) of B rows of T tokens cannot be built, '' if they
    can: for a run to refuse at start-up what would fail at its first batch or evaluation. sdpa takes a
    dense mask; flex takes a BlockMask but trains on GPU only (elsewhere the run falls back to sdpa)."""
    if backend == "flex" and flex_backward_available(device_type):
        return ""
    return dense_mask_error(B, T, T)


def dense_mask(mask_mod: MaskMod, B: int, Q: int, KV: int, device: torch.device) -> Tensor:
    """The (B, 1, Q, KV) boolean mask of `mask_mod` by broadcasting index grids: one elementwise pass,
    no vmap, and traceable by torch.compile (the cached decode step builds one every token)."""
    if why := dense_mask_error(B, Q, KV):
        raise ValueError(why)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(Q, device=device).view(1, 1, Q, 1)
    kv = torch.arange(KV, device=device).view(1, 1, 1, KV)
    return mask_mod(b, h, q, kv).expand(B, 1, Q, KV)


def unsparse_block_mask(mask_mod: MaskMod, B: int, Q: int, KV: int, device: torch.device) -> BlockMask:
    """A BlockMask whose every block is partial (mask_mod evaluated everywhere), made without evaluating
    the mask: for a few query rows (decoding) there are no blocks worth skipping, and create_block_mask's
    vmap would cost ~30 ms a call on CPU."""
    size = 128
    q_blocks, kv_blocks = -(-Q // size), -(-KV // size)
    num = torch.full((B, 1, q_blocks), kv_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(kv_blocks, dtype=torch.int32, device=device).expand(B, 1, q_blocks, kv_blocks)
    return BlockMask.from_kv_blocks(
        num, indices.contiguous(), BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(Q, KV)
    )


def build_mask(
    mask_mod: MaskMod, B: int, Q: int, KV: int, device: torch.device, backend: str
) -> Tensor | BlockMask:
    """A data-dependent mask for one batch, in the form `backend` takes; built per batch, never cached."""
    if backend == "sdpa":
        return dense_mask(mask_mod, B, Q, KV, device)
    if Q <= 16:
        return unsparse_block_mask(mask_mod, B, Q, KV, device)
    return create_block_mask(mask_mod, B, None, Q, KV, device=device)


_MASKS: dict[tuple, BlockMask | Tensor] = {}


def cached_mask(mask: str, seq_len: int, device: torch.device, block: bool) -> BlockMask | Tensor:
    """A BlockMask (flex) or dense (1, 1, T, T) boolean mask (sdpa) of a static mask, built once per
    (mask, length, device).

    A plain dict rather than lru_cache or a compiler-disabled function, so torch.compile reads it
    without a graph break: the first compiled call builds and stores the mask, costing one recompile
    (guarded on the key); later compiled steps reuse the cached mask.
    """
    key = (mask, seq_len, torch.device(device), block)
    if key not in _MASKS:
        mask_mod = get_mask_mod(mask)
        if block:
            _MASKS[key] = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
        else:
            _MASKS[key] = dense_mask(mask_mod, 1, seq_len, seq_len, torch.device(device))
    return _MASKS[key]


def flex_backward_available(device: torch.device | str) -> bool:
    """Whether flex attention can be trained on `device`: torch has no CPU backward for it (GPU only)."""
    return torch.device(device).type == "cuda"


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask | None, gqa: bool) -> Tensor:
    # Inside a compiled model flex_attention is traced and fused as is; eager on GPU it must be
    # compiled on its own; eager on CPU it runs unfused (compiling it there is slow and optional).
    eager_gpu = q.is_cuda and not torch.compiler.is_compiling()
    flex = _compiled_flex_attention() if eager_gpu else flex_attention
    return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Q, d) and k, v (B, H_kv, KV, d); H_kv divides H (GQA).

    `mask` is a static name (or None), or a mask built for this batch by `build_mask`, whose type
    (BlockMask or boolean tensor) then decides the kernel.
    """
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, gqa)
    seq_len = q.shape[2]
    if backend == "sdpa":
        if mask is None or mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=gqa)
        attn_mask = cached_mask(mask, seq_len, q.device, block=False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    if backend == "flex":
        block_mask = None if mask is None else cached_mask(mask, seq_len, q.device, block=True)
        return _flex(q, k, v, block_mask, gqa)
    raise ValueError(f"unknown attention backend {backend!r} (expected one of {BACKENDS})")


# -------------------------------------------------------------------------------------------- KV cache


MIN_KV_BUCKET = 32  # the shortest cache prefix a decode step attends to


class LayerCache(NamedTuple):
    """One layer's view of a KVCache during one forward: its buffers and the slots being written."""

    k: Tensor  # (B, n_kv_heads, max_len, head_dim)
    v: Tensor
    slots: Tensor  # (T,) cache slots of this forward's tokens
    kv_len: int  # slots attended to: the first kv_len (KVCache.kv_len)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at `slots`; return the first kv_len slots to attend to.

        index_copy_ with a tensor of slots, not a slice with a Python int, keeps a compiled decode step
        free of recompiles as the cache fills.
        """
        self.k.index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v.index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[:, :, : self.kv_len], self.v[:, :, : self.kv_len]


class KVCache:
    """Static, preallocated keys and values of every layer, (B, n_kv_heads, max_len, head_dim) each:
    grouped-query models store their kv heads once, not repeated per query head.

    Rows of different lengths are left-padded: row b holds padding before slot start[b], and its
    positions (RoPE) count from 0 at start[b]. A forward over T tokens writes slots length..length+T-1
    of every row and attends over the first `kv_len` slots through a mask (`cache_mask`). `kv_len` is
    max_len unless the caller narrows it (`attend_to`): generation attends to the filled prefix rounded
    up to a power of two, so a compiled decode step has a few shapes (one per bucket), not one per
    token, and does not read the empty end of the cache. Writing past max_len is an index error.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        start: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)  # slots filled, the same in every row
        self.start = torch.zeros(batch, dtype=torch.long, device=device)  # first real slot of each row
        if start is not None:
            self.start.copy_(start)
        self.kv_len = max_len  # slots attended to (a Python int: a compiled step guards on it)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def slots(self, T: int) -> Tensor:
        """Slots of the next T tokens."""
        return self.length + torch.arange(T, device=self.length.device)

    def positions(self, slots: Tensor) -> Tensor:
        """(B, T) RoPE positions of `slots` in each row; padding slots get 0."""
        return (slots[None, :] - self.start[:, None]).clamp_min(0)

    def attend_to(self, filled: int) -> int:
        """Attend to `filled` slots from now on, rounded up to a power of two (at least MIN_KV_BUCKET);
        returns the new kv_len. `filled` is counted on the host by the caller: no device sync."""
        self.kv_len = min(self.max_len, max(MIN_KV_BUCKET, 1 << (max(filled, 1) - 1).bit_length()))
        return self.kv_len

    def layer(self, i: int, slots: Tensor) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], slots, self.kv_len)

    def advance(self, T: int) -> None:
        self.length += T
