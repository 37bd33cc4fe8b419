"""Peak memory and step time of training steps with and without `model.activation_checkpointing`.

Each mode runs in its own child process, so one mode's high-water mark never hides the other's: on CPU
the child's peak RSS (getrusage) next to its RSS before the first step (model, optimizer state and
batch), the difference being what the steps added (activations, gradients); on CUDA
`torch.cuda.max_memory_allocated`. Full steps: forward, cross-entropy, backward, AdamW.

    python benchmarks/activation_checkpointing.py [--dim 256] [--layers 8] [--seq 512] [--batch 8]
                                                  [--steps 3] [--rounds 2] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

MODES = {"off": False, "on": True}


def rss_mib() -> float:
    """This process's current resident set."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def child(args: argparse.Namespace) -> None:
    """One mode: a warm-up step, then timed steps; prints one JSON line."""
    import torch
    import torch.nn.functional as F

    from src.nanollama.model.transformer import Transformer, TransformerConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TransformerConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        activation_checkpointing=MODES[args.child],
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    # optimizer state exists before the baseline, so the difference is what a step itself needs
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }

    def step() -> float:
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) / 2**20 if cuda else rss_mib()
    losses = [step()]  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mib()
    result = {"mode": args.child, "base_mib": base, "peak_mib": peak, "step_s": seconds, "losses": losses}
    print(json.dumps(result))


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", mode, "--device", args.device]
    for key in ("dim", "layers", "heads", "seq", "batch", "vocab", "steps", "threads"):
        argv += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating; best time")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return child(args)

    what = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(
        f"dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, {args.device} "
        f"({args.threads} thread(s)), {args.steps} timed steps after 1 warm-up, best of {args.rounds} "
        f"alternating rounds; memory: {what}"
    )
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # modes alternate, and the fastest round counts: load on a shared box
        for mode in MODES:
            r = run_mode(mode, args)
            best = results.setdefault(mode, r)
            best["step_s"] = min(best["step_s"], r["step_s"])
    print(f"{'checkpointing':>14} {'before MiB':>11} {'peak MiB':>9} {'step adds MiB':>14} {'s/step':>7}")
    for mode, r in results.items():
        added = r["peak_mib"] - r["base_mib"]
        print(f"{mode:>14} {r['base_mib']:>11.0f} {r['peak_mib']:>9.0f} {added:>14.0f} {r['step_s']:>7.2f}")
    off, on = results["off"], results["on"]
    saved = 1 - (on["peak_mib"] - on["base_mib"]) / (off["peak_mib"] - off["base_mib"])
    drift = max(abs(a - b) for a, b in zip(on["losses"], off["losses"]))
    print(
        f"checkpointing: step memory -{saved:.0%}, peak {on['peak_mib'] / off['peak_mib']:.2f}x, "
        f"time {on['step_s'] / off['step_s']:.2f}x; losses differ by {drift:.1e}"
    )


if __name__ == "__main__":
    main()
