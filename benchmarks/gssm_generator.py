"""Throughput of the GSSM generator and of its exact Bayes forward pass (tokens per second, CPU).

python -m benchmarks.gssm_generator [--batch 64] [--seq 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from src.apps.gssm.bayes import conditional_logprobs
from src.apps.gssm.generator import GSSM
from src.apps.gssm.graph import GSSMConfig, NodeConfig

GRAPHS = {
    "2-node": [
        NodeConfig("z", 16),
        NodeConfig("x", 32, parents=["z"], observed=True),
    ],
    "4-node product": [
        NodeConfig("a", 8, kernel_type="product"),
        NodeConfig("b", 8, parents=["a"], kernel_type="product"),
        NodeConfig("c", 8, parents=["b"], kernel_type="product"),
        NodeConfig("x", 32, parents=["a", "b", "c"], kernel_type="product", observed=True),
    ],
    "3-node fullrank": [
        NodeConfig("a", 8),
        NodeConfig("b", 8, parents=["a"]),
        NodeConfig("x", 32, parents=["a", "b"], observed=True),
    ],
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokens = args.batch * args.seq
    rows = []
    for name, nodes in GRAPHS.items():
        gssm = GSSM(GSSMConfig(nodes=nodes))
        rng = np.random.default_rng(0)
        seconds = median_seconds(lambda g=gssm, r=rng: g.sample(args.batch, args.seq, r), args.repeats)
        rows.append((f"sample  {name}", seconds))
    gssm = GSSM(GSSMConfig(nodes=GRAPHS["2-node"]))
    sample = gssm.sample(args.batch, args.seq, np.random.default_rng(0))
    rows.append(("bayes   2-node", median_seconds(lambda: conditional_logprobs(gssm, sample), args.repeats)))
    print(f"batch {args.batch}, seq {args.seq}, median of {args.repeats}")
    print(f"{'what':<26} {'ms':>8} {'M tokens/s':>11}")
    for what, seconds in rows:
        print(f"{what:<26} {seconds * 1e3:>8.2f} {tokens / seconds / 1e6:>11.2f}")


if __name__ == "__main__":
    main()
