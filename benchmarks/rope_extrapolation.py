"""RoPE length extrapolation on GSSM: train at length L, evaluate at L and at factor x L with plain RoPE
and with linear, NTK-aware and YaRN scaling, loss per position bucket beside the Bayes loss of the
same positions (which is not flat: early positions have less context).

    python -m benchmarks.rope_extrapolation [--config ...] [--seq-len 32] [--factor 4] [--steps 400]
        [--buckets 2] [--sequences 512] [--log-dir runs/rope_extrapolation] [key=value ...]

Training runs the real entrypoint (`python -m src.apps.gssm.train`, extra key=value arguments go to
it) and is skipped when the log dir already holds the finished run; every evaluation is what
`python -m src.apps.gssm.eval ... evaluation.seq_len=... model.rope_scaling=...` does, in process, and
appends its line (with seq_len and rope_scaling) to the run's metrics/eval_0.jsonl. The scaled
evaluations use `rope_factor` = factor and `rope_original_length` = L, without any fine-tuning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

from src.apps.gssm.eval import EvalRunConfig, run_eval
from src.apps.gssm.evaluation import bucket_edges
from src.nanollama.config import load_config

SCALINGS = ("none", "linear", "ntk", "yarn")
# A graph where context matters: each sequence has its own transition kernel, inferred in context.
CONFIG = "src/apps/gssm/configs/context.yaml"
MODEL = ["model.dim=64", "model.n_layers=2", "data.batch_size=32", "optim.warmup=0.05"]


def train(log_dir: Path, config: str, seq_len: int, steps: int, overrides: list[str]) -> float:
    """The training entrypoint as a subprocess; resuming a finished run does nothing. Seconds taken."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "src.apps.gssm.train", f"config={config}"]
    cmd += [f"orchestration.log_dir={log_dir}", *MODEL, f"data.seq_len={seq_len}", f"optim.steps={steps}"]
    cmd += ["evaluation.period=0"]
    cmd += ["orchestration.checkpoint.period=0", "orchestration.logging.period=100", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def evaluate(log_dir: Path, seq_len: int, scaling: str, args: argparse.Namespace, buckets: int) -> dict:
    """eval.py's `run_eval` on the run's last checkpoint with this length and RoPE scaling."""
    argv = [f"config={log_dir}/config.yaml", f"evaluation.seq_len={seq_len}"]
    argv += [f"evaluation.position_buckets={buckets}", f"evaluation.n_sequences={args.sequences}"]
    argv += [f"model.rope_scaling={scaling}"]
    if scaling != "none":
        argv += [f"model.rope_factor={args.factor}", f"model.rope_original_length={args.seq_len}"]
    with contextlib.redirect_stdout(io.StringIO()):
        return run_eval(load_config(EvalRunConfig, argv))


def table(results: dict[str, dict], seq_len: int, buckets: int) -> list[str]:
    """Rows: the Bayes loss, then each scaling's loss; then each scaling's gap. Columns: position buckets."""
    edges = bucket_edges(seq_len, buckets)
    header = f"{'':>12}" + "".join(f"{f'{lo}-{hi - 1}':>9}" for lo, hi in pairwise(edges))
    header += f"{'all':>9}"

    def row(name: str, r: dict, key: str) -> str:
        values = [r[f"{key}_pos_{i}"] for i in range(buckets)] + [r[key]]
        return f"{name:>12}" + "".join(f"{value:9.4f}" for value in values)

    lines = ["loss", header, row("bayes", results["none"], "bayes_loss")]
    lines += [row(name, r, "loss") for name, r in results.items()]
    lines += ["gap = loss - bayes", header]
    return lines + [row(name, r, "gap") for name, r in results.items()]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--seq-len", type=int, default=32, help="training length L")
    parser.add_argument("--factor", type=int, default=4, help="evaluate at factor x L")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--buckets", type=int, default=2, help="position buckets per training length")
    parser.add_argument("--sequences", type=int, default=512, help="held-out sequences per evaluation")
    parser.add_argument("--log-dir", default="runs/rope_extrapolation")
    parser.add_argument("overrides", nargs="*", help="key=value arguments for training")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)

    seconds = train(log_dir, args.config, args.seq_len, args.steps, args.overrides)
    print(f"trained {args.steps} steps at L={args.seq_len} on {args.config} in {seconds:.0f}s ({log_dir})")
    for multiple in (1, args.factor):
        seq_len, buckets = multiple * args.seq_len, multiple * args.buckets
        start = time.perf_counter()
        results = {scaling: evaluate(log_dir, seq_len, scaling, args, buckets) for scaling in SCALINGS}
        print(
            f"\neval at {seq_len} positions ({multiple} x L), {args.sequences} sequences, scaled RoPE with "
            f"factor {args.factor} (nats/token, {time.perf_counter() - start:.0f}s)"
        )
        print("\n".join(table(results, seq_len, buckets)))


if __name__ == "__main__":
    main()
