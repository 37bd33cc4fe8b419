"""Autoregressive generation with a static KV cache: prompts of any lengths at once, greedy or sampled.

Prompts are left-padded into one (B, P) batch: each row's positions start at 0 at its first real token
and the cache's key-padding mask hides the padding (see `KVCache`), so a row generates what it would
alone. One prefill pass writes the prompts into the cache, then every decode step feeds one token per
row. Each step attends only to the filled part of the cache, rounded up to a power of two
(`KVCache.attend_to`), so `compile=True` compiles the step once per (batch size, cache length, bucket):
a handful of shapes, and no step reads the empty end of the cache. Cache lengths are rounded up to a
multiple of `CACHE_ROUNDING` so that prompts of similar lengths share compiled steps.

    from src.nanollama.model.generate import generate
    completions = generate(model, [[5, 3, 9], [7]], max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
"""

import functools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .attention import KVCache
from .transformer import Transformer

CACHE_ROUNDING = 32
PAD_ID = 0  # what fills the left padding; never attended to, so any valid id


def sample(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(B, V) logits -> (B,) next tokens: argmax if temperature is 0, else a draw from the softmax at
    `temperature`, restricted to the top_k best tokens (0: all) and to the smallest set of best tokens
    whose probability reaches top_p (nucleus; 1: all)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], device: torch.device, prefix_lengths: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """(B, P) tokens with each row right-aligned, and (B,) the first real slot of each row. A row is
    prefix_lengths[b] embedding slots (left as PAD_ID, filled by the caller) then its prompt."""
    prefix_lengths = prefix_lengths or [0] * len(prompts)
    lengths = torch.tensor([k + len(p) for k, p in zip(prefix_lengths, prompts)])
    if not prompts or int(lengths.min()) == 0:
        raise ValueError("generate needs at least one prompt, each of at least one token or embedding")
    P = int(lengths.max())
    tokens = torch.full((len(prompts), P), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, P - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
    return tokens.to(device), (P - lengths).to(device)


def decode_step(model: Transformer, tokens: Tensor, cache: KVCache) -> Tensor:
    """(B,) tokens -> (B, V) logits of the next ones; appends the tokens to the cache."""
    return model(tokens[:, None], cache=cache)[:, -1]


@functools.cache
def compiled_decode_step() -> Callable[[Transformer, Tensor, KVCache], Tensor]:
    """`decode_step` compiled, made at first use: building it imports torch._dynamo (a second or two),
    which a run that never generates compiled should not pay at import."""
    # One compiled step per (batch, cache length, bucket): dynamo's default of 8 per function would drop a
    # notebook that generates at a few batch sizes back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(decode_step, fullgraph=True, dynamic=False)


def prefill(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    prefix: Sequence[Tensor] | None = None,
    prefix_lm: bool = False,
) -> tuple[Tensor, KVCache]:
    """Write the prompts (each after its `prefix` embeddings, if any) into a new cache with room for
    max_new_tokens more; (B, V) logits of the first new token. With `prefix_lm` each row's prefix and
    prompt attend to one another both ways, as a prefix-LM saw them in training."""
    device = model.output.weight.device
    k = [0] * len(prompts) if prefix is None else [len(e) for e in prefix]
    if prefix is not None and len(prefix) != len(prompts):
        raise ValueError(f"{len(prefix)} prefixes for {len(prompts)} prompts")
    tokens, start = left_pad(prompts, device, k)
    P = tokens.shape[1]
    max_len = P + max_new_tokens - 1  # the last new token is never fed back
    cache = model.new_cache(len(prompts), -(-max_len // CACHE_ROUNDING) * CACHE_ROUNDING, start)
    cache.attend_to(P)
    embeddings = splice_mask = prefix_len = None
    if prefix is not None and sum(k):
        slot = torch.arange(P, device=device)[None, :]
        splice_mask = (slot >= start[:, None]) & (
            slot < start[:, None] + torch.tensor(k, device=device)[:, None]
        )
        embeddings = torch.cat([e.to(device) for e in prefix])
    if prefix_lm:
        prefix_len = P - start  # the whole row, in its own positions
    logits = model(tokens, embeddings=embeddings, splice_mask=splice_mask, prefix_len=prefix_len, cache=cache)
    return logits[:, -1], cache


def truncate(tokens: list[int], stop_tokens: Sequence[int]) -> list[int]:
    """Tokens up to and including the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_tokens:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    compile: bool = False,
    stop_check_every: int = 8,
    prefix: Sequence[Tensor] | None = None,
    prefix_lm: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (prompt excluded): max_new_tokens of them, or fewer when a row
    emits one of `stop_tokens` (kept as its last token; a finished row never changes again).

    temperature 0 is greedy; otherwise sampling, with top_k / top_p filtering, reproducible with `seed`
    (a torch.Generator on the model's device; None: torch's global RNG). Whether every row has finished
    is checked every `stop_check_every` steps, the only host syncs of the loop.

    prefix[b] (k_b, dim): embeddings (e.g. an image's projected patches) that row b reads before its
    prompt, which may then be empty; `prefix_lm`: prefix and prompt are read bidirectionally (see
    `prefill`). Decoding after them is causal and cached as for plain prompts.
    """
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    logits, cache = prefill(model, prompts, max_new_tokens, prefix, prefix_lm)
    device = logits.device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    step = compiled_decode_step() if compile else decode_step
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.empty(len(prompts), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    k = [0] * len(prompts) if prefix is None else [len(e) for e in prefix]
    n, filled = max_new_tokens, max(len(p) + j for p, j in zip(prompts, k))  # slots filled, on the host
    for i in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        out[:, i] = tokens
        if len(stop_tokens):
            done |= torch.isin(tokens, stop)
            if (i + 1) % stop_check_every == 0 and bool(done.all()):
                n = i + 1
                break
        if i + 1 < max_new_tokens:
            bucket, filled = cache.kv_len, filled + 1
            # A step in the same bucket as the last sees the same model, cache and shapes: skip
            # re-checking the compiled step's guards (~40 tensors; a tenth of a step at this size).
            trusted = cache.attend_to(filled) == bucket and compile and i > 0
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if trusted else nullcontext():
                logits = step(model, tokens, cache)
    return [truncate(row, stop_tokens) for row in out[:, :n].tolist()]
