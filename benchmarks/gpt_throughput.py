"""GPT app training throughput on CPU, eager and compiled, beside Hugging Face's LlamaForCausalLM and the
text loader, all measured in one run.

`app` is the GPT app's own step on a packed batch of the demo corpus: its model and config, its loss
(`gpt_loss`, with the document mask), its optimizer and clipping. `ours` and `hf` are
`benchmarks.train_throughput`'s plain causal steps (fused AdamW, no document mask) of our Transformer and
of LlamaForCausalLM with the same dimensions, on the same tokens. The three alternate step by step. The
loader lines are tokens/s of the packed stream, against the best training tokens/s. `--dtype bfloat16`
runs all three under bf16 autocast (the app's `cluster.dtype=bfloat16` path) and measures the bf16 peak.

    python -m benchmarks.gpt_throughput [--config src/apps/gpt/configs/small.yaml] [--steps 10]
        [--dtype float32|bfloat16] [key=value]
"""

import argparse
import shutil
import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.text_loader import add_arguments, config, loader_throughput, tokenizer  # noqa: E402
from benchmarks.train_throughput import (  # noqa: E402
    INDUCTOR_DIR,
    flops_per_token,
    make_step,
    matmul_peak,
    time_steps,
)
from src.apps.gpt.train import TrainConfig, build_model, gpt_loss  # noqa: E402
from src.nanollama.data.packing import TextStream  # noqa: E402
from src.nanollama.hf import to_hf_config  # noqa: E402
from src.nanollama.optim import build_optimizer, clip_grad_norm  # noqa: E402


def app_step(
    cfg: TrainConfig, model: torch.nn.Module, compile: bool, batch: list[torch.Tensor], dtype: torch.dtype
):
    """The GPT app's training step, without the loop's bookkeeping (metrics, checkpoints)."""
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    loss_fn = partial(gpt_loss, model)
    loss_fn = torch.compile(loss_fn) if compile else loss_fn

    def step() -> float:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # as Cluster.autocast
            loss = loss_fn(batch)
        loss.backward()
        clip_grad_norm(model, cfg.optim.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--mode", choices=["both", "eager", "compile"], default="both")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (compilation)")
    args = parser.parse_args()

    cfg = config(args.config, args.overrides)
    dtype = getattr(torch, args.dtype)
    tok = tokenizer(cfg, cfg.tokenizer)
    cfg.model.vocab_size = tok.vocab_size
    batch = list(next(TextStream(cfg.data, tok)))
    tokens, doc_ids = batch
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    models = {"app": build_model(cfg, training=True, device=torch.device("cpu"))}
    models["ours"] = build_model(cfg, training=True, device=torch.device("cpu"))
    models["hf"] = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**to_hf_config(cfg.model), attn_implementation="sdpa")
    )
    m = cfg.model
    n_params = sum(p.numel() for p in models["app"].parameters())
    fpt = flops_per_token(models["app"], cfg.data.seq_len)
    pieces = int(doc_ids[:, -1].sum()) + len(doc_ids)  # (part of) documents in the rows
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {args.dtype}, {m.attention} attention\n"
        f"model ({args.config}): dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size} "
        f"({cfg.tokenizer.kind}), {n_params / 1e6:.2f}M params; batch {cfg.data.batch_size} x seq "
        f"{cfg.data.seq_len} of the demo corpus ({pieces} documents in the rows); {fpt / 1e6:.1f} MFLOP/token"
    )
    peak = matmul_peak(dtype)

    results = {}
    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    try:
        for mode in modes:
            compile = mode == "compile"
            steps = {"app": app_step(cfg, models["app"], compile, batch, dtype)}
            steps |= {name: make_step(name, models[name], compile, x, y, dtype) for name in ("ours", "hf")}
            times = time_steps(steps, args.warmup, args.steps, mode)
            results[mode] = {name: x.numel() / statistics.median(ts) for name, ts in times.items()}
            results[mode]["app/hf"] = statistics.median(h / a for a, h in zip(times["app"], times["hf"]))
    finally:
        shutil.rmtree(INDUCTOR_DIR, ignore_errors=True)
    peak = max(peak, matmul_peak(dtype))
    loaders = loader_throughput(cfg, seconds=3.0)

    header = ("mode", "app tok/s", "ours tok/s", "HF tok/s", "app MFU", "HF MFU", "app/HF")
    print("\n{:<8} {:>10} {:>11} {:>9} {:>8} {:>7} {:>7}".format(*header))
    for mode, r in results.items():
        print(
            f"{mode:<8} {r['app']:>10.0f} {r['ours']:>11.0f} {r['hf']:>9.0f} {r['app'] * fpt / peak:>8.1%} "
            f"{r['hf'] * fpt / peak:>7.1%} {r['app/hf']:>7.2f}"
        )
    print(f"MFU against a measured {args.dtype} matmul peak (2048^3) of {peak / 1e9:.1f} GFLOP/s")
    training = max(r["app"] for r in results.values())
    print(f"\n{'loader (1 thread)':<45} {'tok/s':>12} {'loader/training':>16}")
    for name, rate in loaders.items():
        print(f"{name:<45} {rate:>12,.0f} {rate / training:>15,.0f}x")
    print(f"against the app's best training throughput, {training:,.0f} tok/s")


if __name__ == "__main__":
    main()
