"""FlexAttention against sdpa for causal and document masks, at several sequence lengths.

Both backends as the model calls them (`src.nanollama.model.attention`): sdpa runs `causal` through its
`is_causal` kernel and documents through a dense (B, 1, T, T) boolean mask; flex takes a BlockMask,
eager (on CPU: unfused, the score matrix materialised) and compiled. Documents are random packings of
about `--docs` documents per row, new for the batch, so their masks are built per batch: that build
time is reported apart (dense mask for sdpa, BlockMask for flex).

On CPU only the forward is timed (inference: torch has no flex backward on CPU); on CUDA forward +
backward, with a device sync around every call. Timed calls alternate between the variants so machine
noise hits them alike; figures are medians.

    python -m benchmarks.attention [--lengths 256 512 1024 2048] [--batch 4] [--heads 4] [--head-dim 64]
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
INDUCTOR_DIR = tempfile.mkdtemp(prefix="inductor_")  # fresh cache: compile times are honest
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_DIR)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from src.nanollama.model.attention import causal_mask, dense_mask, document_mask  # noqa: E402

Call = Callable[[], torch.Tensor]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def random_documents(B: int, T: int, docs: int, g: torch.Generator) -> torch.Tensor:
    """(B, T) document ids: each row cut at docs - 1 random places."""
    cuts = torch.rand(B, T, generator=g) < (docs - 1) / T
    return cuts.long().cumsum(dim=1)


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, ids: torch.Tensor | None) -> dict:
    """name -> (build the mask, attention given the built mask): the calls the model would make."""
    B, _, T, _ = q.shape
    device = q.device
    mask_mod = causal_mask if mask == "causal" else document_mask(ids, causal_mask)
    compiled = torch.compile(flex_attention, dynamic=False)

    def block() -> object:
        return create_block_mask(mask_mod, None if mask == "causal" else B, None, T, T, device=device)

    if mask == "causal":
        sdpa = (lambda: None, lambda _: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    else:
        sdpa = (
            lambda: dense_mask(mask_mod, B, T, T, device),
            lambda m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
        )
    runs = {"sdpa": sdpa, "flex compiled": (block, lambda m: compiled(q, k, v, block_mask=m))}
    if device.type == "cpu":  # eager flex on CUDA materialises T x T scores per head: not how it runs
        runs["flex eager"] = (block, lambda m: flex_attention(q, k, v, block_mask=m))
    return runs


def run_case(
    T: int, mask: str, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median ms of each variant's attention (and of building its mask, per batch) at one length."""
    g = torch.Generator().manual_seed(T)
    shape = (args.batch, args.heads, T, args.head_dim)
    backward = device.type == "cuda"
    q, k, v = (torch.randn(shape, generator=g).to(device).requires_grad_(backward) for _ in range(3))
    ids = random_documents(args.batch, T, args.docs, g).to(device) if mask == "document" else None
    runs = variants(q, k, v, mask, ids)
    built = {name: build() for name, (build, _) in runs.items()}

    def call(name: str) -> None:
        out = runs[name][1](built[name])
        if backward:
            out.sum().backward()

    reference = runs["sdpa"][1](built["sdpa"])
    result: dict[str, dict[str, float]] = {}
    for name in runs:
        t = time.perf_counter()
        out = runs[name][1](built[name])  # warmup: compilation
        sync(device)
        error = (out - reference).abs().max().item()
        print(
            f"  T={T} {mask}: {name} first call {time.perf_counter() - t:.1f}s, "
            f"max |diff| to sdpa {error:.1e}"
        )
        call(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    builds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.reps):
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            times[name].append(timed(lambda name=name: call(name), device))
            builds[name].append(timed(runs[name][0], device))
    for name in runs:
        result[name] = {
            "ms": 1e3 * statistics.median(times[name]),
            "build_ms": 1e3 * statistics.median(builds[name]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--docs", type=int, default=6, help="documents per row, on average")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    what = (
        "forward + backward" if device.type == "cuda" else "forward only (inference: no flex backward on CPU)"
    )
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {where}, fp32; "
        f"batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}"
    )
    print(f"timing: {what}")

    rows = []
    for T in args.lengths:
        for mask in ("causal", "document"):
            rows.append((T, mask, run_case(T, mask, args, device)))

    names = list(rows[0][2])
    print(
        f"\n{'T':>6} {'mask':<9}"
        + "".join(f"{name + ' ms':>18}" for name in names)
        + f"{'sdpa / flex compiled':>22}"
    )
    for T, mask, r in rows:
        ratio = r["sdpa"]["ms"] / r["flex compiled"]["ms"]
        print(f"{T:>6} {mask:<9}" + "".join(f"{r[name]['ms']:>18.2f}" for name in names) + f"{ratio:>22.2f}")
    print("\nper-batch mask build (document masks are data-dependent; causal ones are built once and cached)")
    print(f"{'T':>6} {'dense bool (sdpa) ms':>22} {'BlockMask (flex) ms':>21}")
    for T, mask, r in rows:
        if mask == "document":
            print(f"{T:>6} {r['sdpa']['build_ms']:>22.2f} {r['flex compiled']['build_ms']:>21.2f}")


if __name__ == "__main__":
    main()
