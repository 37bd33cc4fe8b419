"""dVAE training throughput (grids/s), eager against torch.compile, same model, same batches, one run.

Why: the researchers' seed reported torch.compile turning 56k into 1.5M samples/s (27x) for their dVAE
on an L40S GPU. This measures the same ratio for this app's model (`src/apps/dvae/model.py`): a full
training step (forward with the quantiser drawing from a per-batch generator as in training, the app's
objective `dvae_objective` with its KL and beta-TCVAE terms, backward, gradient clipping, AdamW over the
core's param groups) on random but valid serialised grids. The compiled copy is compiled in place
(`model.compile()`, what `cluster.compile=true` does), starts from the same weights and sees the same
batches. Warmup steps (compilation included, timed on their own) are left out; timed blocks of `--steps`
steps alternate between the two, the order reversed every other repeat, and the ratio is the median of
the per-repeat ratios. `graphs` / `breaks` are what dynamo compiled for the model's forward: one graph,
no break (the quantisers' `torch.Generator` draws, which dynamo cannot trace, are made before the model
runs, in `draw_uniforms`; drawn amid the forward they split it into 4 graphs, and compile gained 1.17x
instead of the figure in the README).

    python -m benchmarks.dvae_throughput [--device cpu|cuda] [--dtype float32|bfloat16] [--batch-size 32]
        [--max-size 8] [--dim 64] [--layers 2] [--n-latents 16] [--n-codes 64] [--quantiser gumbel|reinmax]
        [--steps 10] [--repeats 5]
"""

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
INDUCTOR_DIR = tempfile.mkdtemp(prefix="inductor_dvae_")  # under the system temp dir; fresh: honest compiles
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_DIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from src.apps.dvae.data import batch_generator, serialise  # noqa: E402
from src.apps.dvae.losses import LossConfig, dvae_objective  # noqa: E402
from src.apps.dvae.model import DVAE, DVAEConfig  # noqa: E402
from src.nanollama.config import validate  # noqa: E402
from src.nanollama.model.transformer import TransformerConfig  # noqa: E402
from src.nanollama.optim import OptimConfig, build_optimizer  # noqa: E402

SEED_RATIO = 1.5e6 / 56e3  # the seed's compiled / eager samples/s on an L40S


def make_batches(n: int, batch_size: int, max_size: int, vocab, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of grids of random shapes (1..max_size a side) and colours, serialised as in data.py."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        rows = []
        for _ in range(batch_size):
            h, w = rng.integers(1, max_size + 1, size=2)
            rows.append(serialise(rng.integers(0, vocab.n_colours, size=(h, w)), vocab, max_size))
        batches.append(torch.from_numpy(np.stack(rows)))
    return batches


def build_model(args: argparse.Namespace) -> DVAE:
    def part() -> TransformerConfig:
        return TransformerConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, causal=False)

    cfg = DVAEConfig(n_latents=args.n_latents, n_codes=args.n_codes, encoder=part(), decoder=part())
    validate(cfg)  # fills in the vocabulary size
    torch.manual_seed(0)
    return DVAE(cfg, args.max_size)


def make_step(
    model: DVAE, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """One training step on (tokens, batch index) as a closure; returns the loss, not synchronised."""
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.01, beta2=0.999), device.type)
    loss_cfg, pad = LossConfig(pad_weight=0.0), model.cfg.vocab.pad

    def step(tokens: torch.Tensor, index: int) -> torch.Tensor:
        g = batch_generator(device, 0, 0, index)  # as training: every draw keyed by the batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            recon, logits, codes = model(tokens, args.quantiser, args.tau, None, g, 1.0)
        loss, _ = dvae_objective(recon, tokens, logits, codes, loss_cfg, 0.05, pad, 2000)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # no host sync, unlike the core's logging one
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--batch-size", type=int, default=32, help="grids per step")
    parser.add_argument("--max-size", type=int, default=8, help="canvas side S: (S + 1)^2 tokens a grid")
    parser.add_argument("--dim", type=int, default=64, help="encoder and decoder width")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder blocks (each)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n-latents", type=int, default=16, help="N, latent positions a grid")
    parser.add_argument("--n-codes", type=int, default=64, help="K, codebook size")
    parser.add_argument("--quantiser", choices=["gumbel", "reinmax"], default="gumbel")
    parser.add_argument("--tau", type=float, default=1.0, help="temperature (reinmax needs >= 1)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per mode, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (compilation)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    eager = build_model(args).to(device)
    compiled = copy.deepcopy(eager)  # same weights
    compiled.compile()  # in place, as cluster.wrap with cluster.compile=true
    batches = make_batches(args.steps, args.batch_size, args.max_size, eager.cfg.vocab)
    batches = [b.to(device) for b in batches]
    models = {"eager": eager, "compiled": compiled}
    steps = {mode: make_step(model, args, device, dtype) for mode, model in models.items()}
    n_params = sum(p.numel() for p in eager.parameters())
    threads = f"{torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(
        f"torch {torch.__version__}, {args.device} ({name}), {args.dtype}; dVAE {args.quantiser}: "
        f"dim {args.dim}, {args.layers} + {args.layers} layers, {args.heads} heads, N={args.n_latents}, "
        f"K={args.n_codes}, {n_params / 1e6:.2f}M params; batch {args.batch_size} grids of up to "
        f"{args.max_size}x{args.max_size} ({(args.max_size + 1) ** 2} tokens each)"
    )

    warmup, graphs, losses = {}, {}, {}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    try:
        for mode, step in steps.items():
            torch._dynamo.utils.counters.clear()
            sync(device)
            t = time.perf_counter()
            for i in range(args.warmup):
                step(batches[i % len(batches)], i)
            sync(device)
            warmup[mode] = time.perf_counter() - t
            stats = torch._dynamo.utils.counters
            graphs[mode] = (stats["stats"]["unique_graphs"], sum(stats["graph_break"].values()))
            print(f"  [{mode}] {args.warmup} warmup steps in {warmup[mode]:.1f}s", flush=True)
        for r in range(args.repeats):
            for mode in list(steps)[:: 1 if r % 2 == 0 else -1]:
                sync(device)
                t = time.perf_counter()
                for i, tokens in enumerate(batches):
                    loss = steps[mode](tokens, i)
                sync(device)
                times[mode].append(time.perf_counter() - t)
                losses[mode] = float(loss)
    finally:
        shutil.rmtree(INDUCTOR_DIR, ignore_errors=True)

    grids = args.batch_size * args.steps
    header = ("mode", "grids/s", "step ms", "best ms", "worst ms", "warmup s", "graphs", "breaks", "loss")
    print("\n{:<9} {:>10} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>7}".format(*header))
    for mode, ts in times.items():
        ms = [t / args.steps * 1e3 for t in ts]
        median, (g, b) = statistics.median(ms), graphs[mode]
        print(
            f"{mode:<9} {grids / statistics.median(ts):>10,.0f} {median:>8.1f} {min(ms):>8.1f} "
            f"{max(ms):>9.1f} {warmup[mode]:>9.1f} {g:>7} {b:>7} {losses[mode]:>7.3f}"
        )
    ratio = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
    compile_s = warmup["compiled"] - warmup["eager"]
    print(
        f"\ncompiled / eager: {ratio:.2f}x (median of {args.repeats} paired blocks of {args.steps} steps); "
        f"compilation ~{compile_s:.1f}s (compiled warmup - eager warmup); the seed's L40S figure: "
        f"{SEED_RATIO:.1f}x (56k -> 1.5M samples/s)"
    )


if __name__ == "__main__":
    main()
