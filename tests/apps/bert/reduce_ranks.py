"""Run under torchrun with 2 ranks (tests/apps/bert/test_bert.py): each rank tallies predictions of its own,
uneven share, reduces, and writes its local and reduced metrics to `{folder}/rank_{rank}.json` (a file of
its own: the ranks' stdout lines can interleave)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from src.apps.bert.tasks import Tally
from src.nanollama.distributed import Cluster, ClusterConfig


def share(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: 4 predictions, 3 right; rank 1: 10 predictions, 2 right (fixed, so the test can redo them)."""
    g = torch.Generator().manual_seed(rank)
    n, right = (4, 3) if rank == 0 else (10, 2)
    labels = torch.randint(0, 2, (n,), generator=g)
    pred = torch.where(torch.arange(n) < right, labels, 1 - labels)
    logits = torch.nn.functional.one_hot(pred, 2).float() * torch.rand(n, 1, generator=g).add(0.5)
    return logits, labels


def main() -> None:
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        tally = Tally()
        tally.add(*share(cluster.rank))
        local = tally.metrics(binary=True)
        reduced = tally.reduce(cluster).metrics(binary=True)
        record = {"rank": cluster.rank, "local": local, "reduced": reduced}
        (Path(sys.argv[1]) / f"rank_{cluster.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
