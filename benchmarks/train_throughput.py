"""Training throughput of our Transformer against Hugging Face's LlamaForCausalLM, same dimensions, CPU.

Full steps (forward, cross-entropy, backward, AdamW) in eager mode and under torch.compile, in fp32 or
under bf16 autocast (`--dtype`, the same for both models). The two models' timed steps alternate so that
machine noise hits both alike; MFU is against a matmul peak of the same dtype measured in the same run.

    python benchmarks/train_throughput.py [--dtype float32|bfloat16] [--mode both|eager|compile] [--steps 20]
                                          [--profile]   # also: where each model's step spends its time
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
INDUCTOR_DIR = tempfile.mkdtemp(prefix="inductor_")  # fresh cache: compile times are honest
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_DIR)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from src.nanollama.hf import to_hf_config  # noqa: E402
from src.nanollama.model.transformer import Transformer, TransformerConfig  # noqa: E402

TARGETS = {"eager": 1.0, "compile": 1.3}  # wanted tokens/s ratio, ours / HF


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    cfg = TransformerConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads, attention="sdpa"
    )
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    assert n_ours == n_hf, f"models differ in size: {n_ours} vs {n_hf}"
    return {"ours": ours, "hf": hf}


def make_step(
    name: str, model: torch.nn.Module, compile: bool, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
):
    """One full training step as a closure; both models get the same loss, optimizer, precision and
    compile scope."""
    model.train()
    forward = model if name == "ours" else (lambda tokens: model(input_ids=tokens).logits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = forward(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    loss_fn = torch.compile(loss_fn) if compile else loss_fn

    def step() -> float:
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10) -> float:
    """Best matmul FLOP/s of this machine in `dtype`, the ceiling a dense model can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model: Transformer, seq: int) -> float:
    """6 N for the matmuls (N without the embedding lookup) plus PaLM's 12 L d T attention term."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq


def time_steps(
    steps: dict[str, Callable[[], float]], warmup: int, rounds: int, label: str
) -> dict[str, list]:
    """Seconds of each step over `rounds` rounds, after `warmup` untimed ones (compilation). Steps of a
    round run back to back, the order reversed every other round, so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for name, step in steps.items():
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  [{label}] {name}: {warmup} warmup steps in {time.perf_counter() - t:.1f}s", flush=True)
    for i in range(rounds):
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            losses[name] = steps[name]()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(
            f"  [{label}] {name}: step median {statistics.median(ts) * 1e3:.0f} ms, "
            f"best {min(ts) * 1e3:.0f} ms, worst {max(ts) * 1e3:.0f} ms; final loss {losses[name]:.3f}"
        )
    return times


def profile_steps(steps: dict[str, Callable[[], float]], label: str, rows: int = 12) -> None:
    """torch.profiler's self-time table of 3 steps of each model: where the time goes besides matmuls."""
    from torch.profiler import ProfilerActivity, profile

    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48
        )
        print(f"\n  [{label}] {name}: profile of 3 steps\n{table}")


def run_mode(mode: str, models: dict, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of each model (median step) and the median over rounds of their paired speed ratio."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    dtype = getattr(torch, args.dtype)
    steps = {name: make_step(name, m, mode == "compile", x, y, dtype) for name, m in models.items()}
    times = time_steps(steps, args.warmup, args.steps, mode)
    if args.profile:
        profile_steps(steps, mode)
    tokens = args.batch * args.seq
    result = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    # Steps of the same round ran back to back, under the same load from whatever else runs here.
    result["ratio"] = statistics.median(h / o for o, h in zip(times["ours"], times["hf"], strict=True))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "eager", "compile"], default="both")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--profile", action="store_true", help="print each model's torch.profiler table")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {args.dtype}, sdpa attention for both"
    )
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(dtype)
    models = build_models(args)
    fpt = flops_per_token(models["ours"], args.seq)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    print(
        f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
        f"{n_params / 1e6:.2f}M params; batch {args.batch} x seq {args.seq}; {fpt / 1e6:.1f} MFLOP/token"
    )

    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    try:
        results = {mode: run_mode(mode, models, args) for mode in modes}
    finally:
        shutil.rmtree(INDUCTOR_DIR, ignore_errors=True)
    peak = max(peak, matmul_peak(dtype))  # the best of two, as other load on the machine only lowers it

    header = ("mode", "ours tok/s", "HF tok/s", "ours MFU", "HF MFU", "ratio", "target")
    print("\n{:<8} {:>11} {:>10} {:>9} {:>7} {:>6} {:>7}".format(*header))
    for mode, r in results.items():
        ratio = r["ratio"]
        mfu = {name: r[name] * fpt / peak for name in ("ours", "hf")}
        needed = TARGETS[mode] * mfu["hf"]  # the MFU at which ours would meet the target
        verdict = "ok" if ratio >= TARGETS[mode] else f"MISSED (needs ours at {needed:.0%} MFU)"
        print(
            f"{mode:<8} {r['ours']:>11.0f} {r['hf']:>10.0f} {mfu['ours']:>9.1%} {mfu['hf']:>7.1%} "
            f"{ratio:>6.2f} {'>= ' + str(TARGETS[mode]):>7} {verdict}"
        )
    print(f"MFU against a measured {args.dtype} matmul peak (2048^3) of {peak / 1e9:.1f} GFLOP/s")
    if len(results) == 2:
        print(
            f"ours compiled / HF eager (medians): {results['compile']['ours'] / results['eager']['hf']:.2f}"
        )


if __name__ == "__main__":
    main()
