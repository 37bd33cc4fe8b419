"""Decode throughput of our `generate` against transformers' `generate`, on the same weights, CPU.

Our Transformer (random init) is saved as a checkpoint, exported with `src.nanollama.hf.export_hf` and
loaded back with `LlamaForCausalLM.from_pretrained`. Both generate greedily from the same left-padded
prompts (16-32 tokens, per-row positions from each row's first real token), so the tokens must be
identical; HF runs with its default dynamic cache and with `cache_implementation="static"` (and, with
--hf-compile, that static cache under HF's own torch.compile), and the faster HF variant is the
reference. Timed calls alternate between all variants so that machine noise hits them alike; each
figure is new tokens / wall time of a whole `generate` call (prefill included), median over rounds.
One thread by default, for both: decode ops are too small to split, and on a busy machine OpenMP's
waits between threads make every op ~10x slower (measured: 36 ms a step with 2 threads, 2.6 with 1).

With `--dtype bfloat16` both models run with bf16 weights and cache; tokens are then compared, not
required to match (the two models round differently), and the share of equal tokens is printed.

    python -m benchmarks.decode_throughput [--batch 1 8] [--new-tokens 128] [--rounds 5] [--threads 1]
        [--dtype float32|bfloat16] [--hf-compile]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
INDUCTOR_DIR = tempfile.mkdtemp(prefix="inductor_")  # fresh cache: compile times are honest
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_DIR)

import torch  # noqa: E402
import transformers  # noqa: E402

from src.nanollama.hf import export_hf  # noqa: E402
from src.nanollama.model.generate import generate  # noqa: E402
from src.nanollama.model.io import save_model  # noqa: E402
from src.nanollama.model.transformer import Transformer, TransformerConfig  # noqa: E402

TARGET = 2.0  # wanted tokens/s ratio, ours / the faster HF variant
PAD = 0

Generator = Callable[[], list[list[int]]]


def build_models(args: argparse.Namespace, tmp: Path) -> tuple[Transformer, transformers.LlamaForCausalLM]:
    """Our model and the HF model loaded from its export: the same weights by construction."""
    cfg = TransformerConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads)
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    (tmp / "ckpt").mkdir()
    save_model(tmp / "ckpt", cfg, ours.state_dict())
    export_hf(tmp / "ckpt", tmp / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp / "hf", attn_implementation="sdpa").eval()
    dtype = getattr(torch, args.dtype)
    return ours.to(dtype), hf.to(dtype)


def make_prompts(batch: int, args: argparse.Namespace) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (batch,), generator=g).tolist()
    return [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]


def hf_generator(
    hf: transformers.LlamaForCausalLM, prompts: list[list[int]], new: int, cache: str
) -> Generator:
    """HF generate on left-padded prompts with an attention mask (it derives positions from it)."""
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD)
    if cache != "dynamic":
        kwargs["cache_implementation"] = "static"
    if cache == "static+compile":  # HF compiles on CUDA only unless told otherwise
        config = transformers.CompileConfig(fullgraph=False, mode="default")
        config._compile_all_devices = True
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True

    @torch.no_grad()
    def run() -> list[list[int]]:
        return hf.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, P:].tolist()

    return run


def variants(
    ours: Transformer, hf, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Generator]:
    new = args.new_tokens
    runs = {
        "ours eager": lambda: generate(ours, prompts, new),
        "ours compiled": lambda: generate(ours, prompts, new, compile=True),
        "HF dynamic": hf_generator(hf, prompts, new, "dynamic"),
        "HF static": hf_generator(hf, prompts, new, "static"),
    }
    if args.hf_compile:
        runs["HF static compiled"] = hf_generator(hf, prompts, new, "static+compile")
    return runs


def run_batch(ours: Transformer, hf, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of every variant at one batch size; asserts they all give the same tokens."""
    prompts = make_prompts(batch, args)
    runs = variants(ours, hf, prompts, args)
    reference = None
    for name, run in runs.items():  # warmup: compilation, first-call allocations
        t = time.perf_counter()
        tokens = run()
        print(f"  [batch {batch}] {name}: first call {time.perf_counter() - t:.1f}s", flush=True)
        reference = tokens if reference is None else reference
        same = tokens == reference
        equal = sum(a == b for x, y in zip(tokens, reference) for a, b in zip(x, y)) / sum(map(len, tokens))
        print(f"  [batch {batch}] {name}: tokens identical to ours eager: {same} ({equal:.0%} equal)")
        assert same or args.dtype != "float32", f"{name} generated different tokens"
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.rounds):  # alternate, and reverse the order every other round
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {name: batch * args.new_tokens / statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and cache"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed generate calls per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--hf-compile", action="store_true", help="also HF's static cache under torch.compile"
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {args.dtype}, greedy, sdpa attention for both"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_models(args, Path(tmp))
        n_params = sum(p.numel() for p in ours.parameters())
        print(
            f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
            f"{n_params / 1e6:.2f}M params; prompts of {args.prompt_min}-{args.prompt_max} tokens, "
            f"{args.new_tokens} new tokens"
        )
        results = {batch: run_batch(ours, hf, batch, args) for batch in args.batch}

    names = list(next(iter(results.values())))
    print("\nnew tokens/s (median of {} rounds)".format(args.rounds))
    print(f"{'batch':<6}" + "".join(f"{name:>20}" for name in names))
    for batch, r in results.items():
        print(f"{batch:<6}" + "".join(f"{r[name]:>20.0f}" for name in names))
    print()
    for batch, r in results.items():
        best_hf = max((n for n in r if n.startswith("HF")), key=r.get)
        for ours_name in ("ours eager", "ours compiled"):
            ratio = r[ours_name] / r[best_hf]
            verdict = "ok" if ratio >= TARGET else "MISSED"
            print(f"batch {batch}: {ours_name} / {best_hf} = {ratio:.2f} (target >= {TARGET}) {verdict}")


if __name__ == "__main__":
    main()
