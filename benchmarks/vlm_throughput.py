"""VLM throughput side by side in one run: training samples/s eager against torch.compile, and answers/s
generated with the KV cache against without it (every new token re-runs the whole row).

The model, the processor and the batches are a config's own (default the app's debug.yaml, any override
as `key=value`): real digits-and-text batches from the training mixture, the app's loss, AdamW over the
core's groups. The compiled copy starts from the same weights (`model.compile()`, what cluster.compile
does). Timed blocks alternate between the two modes, the order reversed every other repeat; the ratios
are medians of the per-repeat ratios. Generation answers held-out digit questions greedily; both paths
must give the same answers (checked).

    python -m benchmarks.vlm_throughput [--device cpu|cuda] [--steps 8] [--repeats 5] [--answers 64]
        [config=src/apps/vlm/configs/debug.yaml] [key=value ...]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
INDUCTOR_DIR = tempfile.mkdtemp(prefix="inductor_vlm_")  # fresh: honest compiles
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_DIR)

import torch  # noqa: E402

from src.apps.vlm.data import DigitsDataset  # noqa: E402
from src.apps.vlm.model import VLM, vlm_loss  # noqa: E402
from src.apps.vlm.train import TrainConfig, build_mixture, build_model, load_tokenizer, row_builder  # noqa: E402
from src.nanollama.config import load_config  # noqa: E402
from src.nanollama.distributed import Cluster  # noqa: E402
from src.nanollama.optim import build_optimizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def answer_without_cache(
    model: VLM, images: torch.Tensor, prompts: list[list[int]], n: int
) -> list[list[int]]:
    """Greedy answers re-running every row whole for each new token (rows of equal prompt length)."""
    k = model.n_image_tokens
    embeddings = model.image_embeddings(images)
    tokens = torch.tensor([[0] * k + p for p in prompts], device=images.device)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :k] = True
    prefix_len = torch.full((len(prompts),), tokens.shape[1], device=images.device)
    out = []
    for _ in range(n):
        logits = model.lm(tokens, embeddings=embeddings, splice_mask=mask, prefix_len=prefix_len)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    return torch.stack(out, 1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per mode, interleaved")
    parser.add_argument("--answers", type=int, default=64, help="questions answered per generation block")
    args, overrides = parser.parse_known_args()
    if not any(o.startswith("config=") for o in overrides):
        overrides = ["config=src/apps/vlm/configs/debug.yaml", *overrides]
    cfg = load_config(TrainConfig, [*overrides, f"cluster.device={args.device}"])
    device = torch.device(args.device)
    with Cluster(cfg.cluster) as cluster:
        rows = row_builder(cfg, load_tokenizer(cfg))
        mixture = build_mixture(cfg, rows, cluster)
        batches = [next(mixture).to(device) for _ in range(args.steps)]
        eager = build_model(cfg, training=True, device=device).to(device)
        compiled = copy.deepcopy(eager)
        compiled.compile()
        steps = {}
        for mode, model in (("eager", eager), ("compiled", compiled)):
            optimizer = build_optimizer(model, cfg.optim, device.type)

            def step(model=model, optimizer=optimizer) -> None:
                for batch in batches:
                    vlm_loss(model, batch).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            steps[mode] = step
        n_params = sum(p.numel() for p in eager.parameters())
        print(
            f"torch {torch.__version__}, {device} ({torch.get_num_threads()} threads); VLM "
            f"{n_params / 1e6:.2f}M params, {eager.n_image_tokens} image tokens, "
            f"batch {cfg.data.batch_size}, "
            f"seq_len {cfg.data.seq_len}"
        )
        warm = {mode: timed(fn, device) for mode, fn in steps.items()}  # compiles, first steps
        times: dict[str, list[float]] = {mode: [] for mode in steps}
        for r in range(args.repeats):
            for mode in list(steps)[:: 1 if r % 2 == 0 else -1]:
                times[mode].append(timed(steps[mode], device))

        valid = DigitsDataset("valid", cfg.data.valid_fraction)
        samples = [valid[3 * i] for i in range(args.answers)]  # "What digit is this?": equal prompt lengths
        batch = rows(samples).to(device)
        prompts = [rows.prompt_ids(s.prompt) for s in samples]
        n_new = rows.max_answer_tokens([valid])
        eager.eval()
        eos = rows.tokenizer.eos
        gen = {
            "cache": lambda: eager.answer(batch.images, prompts, n_new, eos),
            "no cache": lambda: answer_without_cache(eager, batch.images, prompts, n_new),
        }
        cached, full = gen["cache"](), gen["no cache"]()
        same = all(c == f[: len(c)] for c, f in zip(cached, full))
        gen_times: dict[str, list[float]] = {mode: [] for mode in gen}
        for r in range(args.repeats):
            for mode in list(gen)[:: 1 if r % 2 == 0 else -1]:
                gen_times[mode].append(timed(gen[mode], device))
    shutil.rmtree(INDUCTOR_DIR, ignore_errors=True)

    samples_per_block = cfg.data.batch_size * args.steps
    print(f"\n{'training':<10} {'samples/s':>10} {'step ms':>8} {'first block s':>14}")
    for mode, ts in times.items():
        print(
            f"{mode:<10} {samples_per_block / statistics.median(ts):>10,.0f} "
            f"{statistics.median(ts) / args.steps * 1e3:>8.1f} {warm[mode]:>14.1f}"
        )
    ratio = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
    print(f"compiled / eager: {ratio:.2f}x (median of {args.repeats} paired blocks of {args.steps} steps)")
    print(f"\n{'generation':<10} {'answers/s':>10} {'block ms':>9}   ({n_new} new tokens max, greedy)")
    for mode, ts in gen_times.items():
        print(
            f"{mode:<10} {args.answers / statistics.median(ts):>10,.1f} {statistics.median(ts) * 1e3:>9.1f}"
        )
    ratio = statistics.median(n / c for c, n in zip(gen_times["cache"], gen_times["no cache"]))
    print(f"cache / no cache: {ratio:.2f}x; same answers: {same}")


if __name__ == "__main__":
    main()
