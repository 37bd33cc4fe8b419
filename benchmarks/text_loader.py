"""Throughput of the packed text stream (`TextStream`) on the demo corpus, one CPU thread.

Tokens/s of whole batches (documents drawn, tokenized, packed into rows with document ids), three ways:
UTF-8 bytes and SentencePiece tokenized on the fly, and SentencePiece read from a memory-mapped
pre-tokenized file. `benchmarks.gpt_throughput` prints these beside the GPT training tokens/s.

    python -m benchmarks.text_loader [--config src/apps/gpt/configs/small.yaml] [--seconds 3]
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from src.apps.gpt.train import TrainConfig, load_tokenizer  # noqa: E402
from src.nanollama.config import load_config  # noqa: E402
from src.nanollama.data.packing import TextStream  # noqa: E402
from src.nanollama.data.pretokenize import write_token_file  # noqa: E402
from src.nanollama.data.text import Tokenizer, TokenizerConfig  # noqa: E402


def stream_throughput(stream: TextStream, seconds: float) -> float:
    """Tokens/s (positions the model trains on, batch x seq_len) of batches drawn for about `seconds`."""
    cfg = stream.cfg
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(stream)
        n += 1
    return n * cfg.batch_size * cfg.seq_len / elapsed


def tokenizer(cfg: TrainConfig, tokenizer: TokenizerConfig) -> Tokenizer:
    """The tokenizer the app would build for `cfg` with these settings (`cfg` is left as it is)."""
    model = dataclasses.replace(cfg.model, vocab_size=0)
    return load_tokenizer(dataclasses.replace(cfg, tokenizer=tokenizer, model=model))


def loader_throughput(cfg: TrainConfig, seconds: float) -> dict[str, float]:
    """Tokens/s of the run's stream with each tokenizer and source; SentencePiece with the run's vocabulary
    size (trained once and cached, as the app does)."""
    data = dataclasses.replace(cfg.data, epochs=0)
    byte_tok = tokenizer(cfg, TokenizerConfig(kind="byte"))
    sp_tok = tokenizer(cfg, TokenizerConfig(kind="sentencepiece", vocab_size=cfg.tokenizer.vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = f"{tmp}/train.npy"
        write_token_file(tokens_file, data, sp_tok, progress=False)
        streams = {
            "bytes, on the fly": TextStream(data, byte_tok),
            f"sentencepiece {sp_tok.vocab_size}, on the fly": TextStream(data, sp_tok),
            f"sentencepiece {sp_tok.vocab_size}, memory-mapped file": TextStream(
                dataclasses.replace(data, tokens_file=tokens_file), sp_tok
            ),
        }
        return {name: stream_throughput(stream, seconds) for name, stream in streams.items()}


def config(path: str, overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, [f"config={path}", *overrides])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="src/apps/gpt/configs/small.yaml", help="a GPT app config")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent drawing batches, per loader")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides of the config, e.g. data.seq_len=64"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    cfg = config(args.config, args.overrides)
    print(f"demo corpus, batch {cfg.data.batch_size} x seq {cfg.data.seq_len}; tokens/s of whole batches")
    for name, rate in loader_throughput(cfg, args.seconds).items():
        print(f"  {name:<42} {rate:>12,.0f} tok/s")


if __name__ == "__main__":
    main()
