"""Answer a question about an image with a VLM checkpoint (greedy, KV cache).

    python -m src.apps.vlm.generate config=<run>/config.yaml image=digit.png prompt="What digit is this?"
    python -m src.apps.vlm.generate config=<run>/config.yaml dataset=digits index=7   # a held-out sample

A PNG (any size, grey or colour) goes through the run's processor: resized to `vision.image_size` and
normalised with the run's mean and std. With `dataset`/`index` the image, and unless given the prompt,
come from that dataset's valid split, and the reference answer is printed beside the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...nanollama.config import ConfigError, entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.extras import require
from ...nanollama.trainer import checkpoint_to_evaluate
from .data import Sample, build_dataset
from .eval import EvalRunConfig, load_frozen


@dataclass
class GenerateConfig(EvalRunConfig):
    image: str = ""  # a PNG file
    dataset: str = ""  # or a dataset of the run, by name, with `index` into its valid split
    index: int = 0
    prompt: str = ""  # the question; empty with `dataset`: the sample's own

    def check(self) -> None:
        super().check()
        if bool(self.image) == bool(self.dataset):
            raise ConfigError("image", "give either image=<png> or dataset=<name> index=<i>")
        if self.image and not self.prompt:
            raise ConfigError("prompt", "an image needs a prompt (the question)")
        if self.image:
            require("PIL.Image", "vision", "image")


def read_png(path: str) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]; ConfigError naming the file if it cannot be read."""
    Image = require("PIL.Image", "vision", "image")
    if not Path(path).is_file():
        raise ConfigError("image", f"file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit grey: PIL's RGB conversion would clip it at 255
                grey = np.asarray(img, dtype=np.float32) / 65535.0
                return np.repeat(np.clip(grey, 0, 1)[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 (not an image, truncated: the same one line)
        raise ConfigError("image", f"cannot read {path} as an image ({type(e).__name__})") from None


def pick_sample(cfg: GenerateConfig) -> Sample:
    if cfg.image:
        return Sample(read_png(cfg.image), cfg.prompt, "", "")
    names = [d.name for d in cfg.data.datasets]
    if cfg.dataset not in names:
        raise ConfigError("dataset", f"{cfg.dataset!r} is not one of the run's datasets {names}")
    d = cfg.data.datasets[names.index(cfg.dataset)]
    if d.kind == "text":
        raise ConfigError("dataset", f"{cfg.dataset!r} is a text-only dataset (no image to ask about)")
    ds = build_dataset(d, cfg.data, "valid")
    if not 0 <= cfg.index < len(ds):
        raise ConfigError(
            "index", f"must be in [0, {len(ds)}) for {cfg.dataset}'s valid split, got {cfg.index}"
        )
    sample = ds[cfg.index]
    return sample._replace(prompt=cfg.prompt or sample.prompt)


@torch.no_grad()
def run_generate(cfg: GenerateConfig) -> str:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    sample = pick_sample(cfg)
    with Cluster(cfg.cluster) as cluster:
        rows, model = load_frozen(cfg, path, cluster.device)
        images = rows.processor(sample.image)[None].to(cluster.device)
        budget = rows.max_answer_tokens([build_dataset(d, cfg.data, "valid") for d in cfg.data.datasets])
        tok = rows.tokenizer
        (ids,) = model.answer(images, [rows.prompt_ids(sample.prompt)], max(budget, 16), tok.eos)
        answer = tok.decode(ids).strip()
        if cluster.is_main:
            reference = f" (reference: {sample.answer})" if sample.answer else ""
            print(f"{sample.prompt} -> {answer}{reference}")
    return answer


main = entrypoint(GenerateConfig, run_generate)


if __name__ == "__main__":
    main()
