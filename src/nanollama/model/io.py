"""Rebuild a trained Transformer from a checkpoint folder alone, without the app that trained it.

A folder holds its weights in `model.pt` (our parameter names) and describes its model either by its
own `model.yaml` (a TransformerConfig, e.g. written by `src.nanollama.hf import`) or by the run's
resolved `config.yaml` two levels up (`<log_dir>/checkpoints/<step>/` -> `<log_dir>/config.yaml`,
`model:` section), so notebooks, evaluation and export read every checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..config import ConfigError, build_config, read_yaml, to_yaml
from ..extras import require
from .transformer import Transformer, TransformerConfig

MODEL_YAML = "model.yaml"
WEIGHTS = "model.pt"
EMA_WEIGHTS = "ema.pt"  # the EMA of the weights, same keys (runs with optim.ema_decay > 0)
RUN_CONFIG = "config.yaml"
# Hugging Face folders (hf.py for Llama, vision.py for SigLIP)
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def model_config_file(folder: str | os.PathLike, key: str = "checkpoint") -> Path:
    """The file that describes the model of `folder`: its own model.yaml, else the run's config.yaml."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(key, f"checkpoint folder not found: {folder}")
    for candidate in (folder / MODEL_YAML, folder.parent.parent / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(key, f"{folder} has neither {MODEL_YAML} nor ../../{RUN_CONFIG} describing its model")


def load_model_config(folder: str | os.PathLike, key: str = "checkpoint") -> TransformerConfig:
    """The validated TransformerConfig of a checkpoint folder, vocab_size included."""
    file = model_config_file(folder, key)
    data = read_yaml(file)
    if file.name == RUN_CONFIG:
        data = data.get("model")
        if not isinstance(data, dict):
            raise ConfigError("model", f"no model: section in {file}")
    try:
        cfg = build_config(TransformerConfig, data)
    except ConfigError as e:
        raise ConfigError(f"model.{e.key}", f"{e.message} (in {file})") from None
    if cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size", f"must be set (> 0) in {file}")
    return cfg


def load_weights(
    folder: str | os.PathLike, key: str = "checkpoint", name: str = WEIGHTS
) -> dict[str, Tensor]:
    """The consolidated state dict (`model.pt`, or `name`: `ema.pt`) of a checkpoint folder, on CPU."""
    file = Path(folder) / name
    if not file.is_file():
        raise ConfigError(key, f"no {name} in {folder}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated, not a zip, not tensors: the same error to the user)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(key, f"cannot read {file} ({type(e).__name__}: {first[:120]})") from None


def check_weights(cfg: TransformerConfig, state: dict[str, Tensor], where: str) -> None:
    """Names and shapes against the model `cfg` builds (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        check_shapes(Transformer(cfg), state, where)


def check_shapes(model: torch.nn.Module, state: dict[str, Tensor], where: str) -> None:
    """`state`'s names and shapes against `model`'s, so a mismatch is one line naming the tensor instead
    of load_state_dict's multi-line report."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(where, f"weights do not match the model config: {what}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ConfigError(where, f"{name} has shape {tuple(state[name].shape)}, the config gives {shape}")


def load_model(folder: str | os.PathLike, key: str = "checkpoint") -> Transformer:
    """A Transformer with the weights of a checkpoint folder, on CPU, in eval mode."""
    cfg = load_model_config(folder, key)
    state = load_weights(folder, key)
    check_weights(cfg, state, str(Path(folder) / WEIGHTS))
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval()


def save_model(folder: str | os.PathLike, cfg: TransformerConfig, state: dict[str, Tensor]) -> None:
    """Write `model.pt` and `model.yaml` into an existing folder: a checkpoint readable by load_model."""
    folder = Path(folder)
    torch.save(state, folder / WEIGHTS)
    (folder / MODEL_YAML).write_text(to_yaml(cfg))


def safetensors(feature: str = "Hugging Face interop") -> Any:
    """Imported on use only: training never needs it."""
    return require("safetensors.torch", "hf", feature)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, key: str = "out") -> Iterator[Path]:
    """Yield a temporary sibling of `out`, renamed to `out` only if the block succeeds: a failure
    leaves neither `out` nor the temporary folder behind. Never overwrites."""
    out = Path(out)
    if out.exists():
        raise ConfigError(key, f"already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # os.rename would silently replace an empty folder created meanwhile
            raise ConfigError(key, f"already exists: {out}")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
