"""Write fixed train, valid and test files of K x M problems, in the Internalize-CoT line format.

    python -m src.apps.multiplication.make_data out=data/mult4x4 k=4 m=4 train=80000 valid=1000 test=1000

The splits share no problem (each problem's split is fixed by a hash of (a, b)); no file repeats one.
Point `data.{train,valid,test}_file` at the files to train on them instead of problems drawn on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...nanollama.config import ConfigError, entrypoint
from .data import SPLITS, draw_problems, format_line, make_problem


@dataclass
class MakeDataConfig:
    out: str = "data/multiplication"  # folder of train.txt, valid.txt, test.txt
    k: int = 4
    m: int = 4
    train: int = 80000
    valid: int = 1000
    test: int = 1000
    seed: int = 0

    def check(self) -> None:
        if not (1 <= self.k <= 9 and 1 <= self.m <= 9):
            raise ConfigError("k", f"k and m must be in 1..9, got {self.k}x{self.m}")
        space = 9 * 10 ** (self.k - 1) * 9 * 10 ** (self.m - 1)
        for split, share in zip(SPLITS, (0.9, 0.05, 0.05)):  # of the problems, by hash
            n, most = getattr(self, split), int(space * share / 2)  # at most half: rejection stays quick
            if not 0 <= n <= most:
                raise ConfigError(split, f"must be in 0..{most} for {self.k}x{self.m}, got {n}")


def make_data(cfg: MakeDataConfig) -> dict[str, Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    paths = {}
    for split in SPLITS:
        n, seen = getattr(cfg, split), set()
        paths[split] = out / f"{split}.txt"
        with open(paths[split], "w") as f, tqdm(total=n, desc=split, unit=" problems") as bar:
            while len(seen) < n:
                for a, b in draw_problems(rng, min(4096, n - len(seen)), cfg.k, cfg.m, split):
                    if (a, b) not in seen and len(seen) < n:
                        seen.add((a, b))
                        f.write(format_line(make_problem(a, b, cfg.k, cfg.m)) + "\n")
                        bar.update()
    print(f"wrote {', '.join(f'{getattr(cfg, s)} {s}' for s in SPLITS)} {cfg.k}x{cfg.m} problems to {out}")
    return paths


main = entrypoint(MakeDataConfig, make_data)


if __name__ == "__main__":
    main()
