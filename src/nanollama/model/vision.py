"""SigLIP-style ViT vision encoder for the VLM app, with Hugging Face `SiglipVisionModel` interop.

The encoder is SigLIP's vision tower without its attention-pooling head: a Conv2d patch embedding, a
learned position embedding per patch (no CLS token), pre-norm LayerNorm blocks with biased q/k/v/out
projections and a tanh-GELU MLP, bidirectional attention through `F.scaled_dot_product_attention`, and
a final `post_layernorm`. Modules have HF's names and shapes, so conversion is a pure renaming of tensors
(`to_siglip_state_dict` / `from_siglip_state_dict`) and HF's weights give HF's outputs to fp32 rounding.

`select_layer` picks the features a VLM reads: -1 is HF's `last_hidden_state` (last block, then
post_layernorm: nanoVLM, PaliGemma); k >= 1 is HF's `hidden_states[k]` (block k, no post-norm: LLaVA).
A truncated encoder builds only k blocks and no post_layernorm, so no parameter goes unused (DDP) and no
memory is spent on blocks whose output is thrown away; loading skips the file's blocks above k.

Files: a SigLIP folder (config.json with either SiglipVisionConfig's fields or a SiglipConfig holding a
`vision_config`, plus model.safetensors or a sharded index) or a bare .safetensors file (the config then
comes from our own VisionConfig, or a config.json beside it). Keys may carry `vision_model.` (SiglipModel,
transformers 4's SiglipVisionModel) or not (transformers 5's SiglipVisionModel); the text tower, the
pooling head and the logit scale/bias are skipped, anything else unknown is an error. Tensors are read
one by one with `safe_open`, so a full SiglipModel's text tower is never loaded. Export writes the
`vision_model.` layout, which both transformers 4 and 5 load; a truncated encoder exports as a k-layer
model with an identity post_layernorm (HF's hidden_states[k] is then our output) and records
select_layer in config.json under "nanollama", so our loader gives back the same encoder. Nothing here
imports transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, FileError
from .io import HF_CONFIG, HF_INDEX, HF_WEIGHTS, atomic_folder, safetensors

# SiglipVisionConfig's defaults (google/siglip-base-patch16-224), for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_HF_PREFIX = "vision_model."
# Ours -> HF's (after the optional `vision_model.` prefix).
_TOP = {
    "patch_embedding": "embeddings.patch_embedding",
    "position_embedding": "embeddings.position_embedding",
    "post_layernorm": "post_layernorm",
    "layers": "encoder.layers",
}
_HF_NAME = re.compile(r"(embeddings\.patch_embedding|embeddings\.position_embedding|post_layernorm)\.(\w+)")
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_BLOCK_PARAMS = {
    f"{module}.{p}"
    for module in (
        "layer_norm1",
        "layer_norm2",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    )
    for p in ("weight", "bias")
}
# Parts of a SigLIP checkpoint that are not the vision encoder: skipped on load.
_SKIPPED = re.compile(r"text_model\..*|logit_scale|logit_bias|(vision_model\.)?head\..*")


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 0  # 0: 4 * dim
    norm_eps: float = 1e-6
    # -1: last block then post_layernorm (HF last_hidden_state); k in 1..n_layers: output of block k (HF
    # hidden_states[k]) without post-norm, blocks above k not built (LLaVA-style truncation)
    select_layer: int = -1
    pretrained: str = ""  # SigLIP folder or .safetensors file, loaded by init_weights; empty: random init
    init_std: float = 0.02

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 4 * self.dim

    @property
    def built_layers(self) -> int:
        return self.n_layers if self.select_layer == -1 else self.select_layer

    def check(self) -> None:
        for key in ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.ffn_dim < 0:
            raise ConfigError("ffn_dim", f"must be >= 0 (0: 4 * dim), got {self.ffn_dim}")
        for key in ("norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.image_size % self.patch_size:
            message = f"must divide image_size ({self.image_size}), got {self.patch_size}"
            raise ConfigError("patch_size", message)
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")
        if self.select_layer != -1 and not 1 <= self.select_layer <= self.n_layers:
            raise ConfigError(
                "select_layer", f"must be -1 or in 1..n_layers ({self.n_layers}), got {self.select_layer}"
            )
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ConfigError("pretrained", f"not found: {self.pretrained}")
        if self.pretrained:
            safetensors("pretrained")


# --------------------------------------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2) for p in self.projections)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, -1))

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # HF's gelu_pytorch_tanh


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(cfg.n_patches, cfg.dim)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.built_layers))
        # Only the last-layer output is post-normed; a truncated encoder would leave it unused.
        self.post_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.select_layer == -1 else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) weights, residual-branch outputs scaled by 1/sqrt(2 layers) (as the Transformer),
        zero biases, unit norms; then `cfg.pretrained`'s weights if set. Deterministic given torch's RNG.
        A model built on the meta device: `to_empty(device=...)`, then this (meta tensors load nothing)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * max(1, len(self.layers)))
        nn.init.normal_(self.patch_embedding.weight, std=std)
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.normal_(self.position_embedding.weight, std=std)
        norms = [self.post_layernorm] if self.post_layernorm is not None else []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear, s in ((attn.q_proj, std), (attn.k_proj, std), (attn.v_proj, std), (mlp.fc1, std)):
                nn.init.normal_(linear.weight, std=s)
            for linear in (attn.out_proj, mlp.fc2):  # the writes into the residual stream
                nn.init.normal_(linear.weight, std=residual_std)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
                nn.init.zeros_(linear.bias)
            norms += [layer.layer_norm1, layer.layer_norm2]
        for norm in norms:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        if self.cfg.pretrained and not self.patch_embedding.weight.is_meta:
            load_siglip_weights(self, self.cfg.pretrained)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W), normalised as the checkpoint expects -> features (B, n_patches, dim)."""
        expected = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (B, {', '.join(map(str, expected))}), got {list(pixels.shape)}")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, dim, grid, grid)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # row-major patch order
        for layer in self.layers:
            x = layer(x)
        return x if self.post_layernorm is None else self.post_layernorm(x)


# ------------------------------------------------------------------------------------- pixel shuffle


def _grid(x: Tensor, factor: int) -> int:
    n = x.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pixel shuffle needs a square grid of tokens, got {n}")
    if factor <= 0 or side % factor:
        raise ValueError(f"pixel shuffle factor {factor} must divide the grid side {side}")
    return side


def pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """(B, s*s, D) -> (B, s*s / factor^2, D * factor^2): fewer, wider image tokens for the LM. Token (i, j)
    of the (s/f, s/f) grid is patches (i*f + a, j*f + b) concatenated in row-major (a, b) order, as
    nanoVLM's ModalityProjector.pixel_shuffle."""
    B, _, D = x.shape
    s = _grid(x, factor)
    out = s // factor
    x = x.reshape(B, out, factor, out, factor, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, out * out, D * factor * factor)


def pixel_unshuffle(x: Tensor, factor: int) -> Tensor:
    """The exact inverse of pixel_shuffle: (B, N, D * factor^2) -> (B, N * factor^2, D)."""
    B, _, wide = x.shape
    out = _grid(x, 1)
    if factor <= 0 or wide % (factor * factor):
        raise ValueError(f"pixel unshuffle: width {wide} is not a multiple of factor^2 ({factor}^2)")
    D = wide // (factor * factor)
    x = x.reshape(B, out, out, factor, factor, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, out * out * factor * factor, D)


# ------------------------------------------------------------------------------------------- names


def to_siglip_name(name: str) -> str:
    """Ours -> HF's `vision_model.` layout (e.g. layers.0.mlp.fc1.weight ->
    vision_model.encoder.layers.0.mlp.fc1.weight)."""
    top, _, rest = name.partition(".")
    m = _OURS_LAYER.fullmatch(name)
    if top not in _TOP or (top == "layers" and (m is None or m[2] not in _BLOCK_PARAMS)):
        raise ConfigError(name, "not a parameter of the nanollama VisionEncoder")
    return f"{_HF_PREFIX}{_TOP[top]}.{rest}"


def from_siglip_name(name: str) -> str | None:
    """HF's name (with or without `vision_model.`) -> ours; None for the parts of a SigLIP checkpoint that
    are not the encoder (text tower, pooling head, logit scale/bias); ConfigError for anything else."""
    if _SKIPPED.fullmatch(name):
        return None
    bare = name.removeprefix(_HF_PREFIX)
    if m := _HF_NAME.fullmatch(bare):
        return f"{m[1].removeprefix('embeddings.')}.{m[2]}"
    if (m := _HF_LAYER.fullmatch(bare)) and m[2] in _BLOCK_PARAMS:
        return f"layers.{int(m[1])}.{m[2]}"
    raise ConfigError(name, "not a parameter of HF SiglipVisionModel")


def to_siglip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {to_siglip_name(name): t for name, t in state.items()}


def from_siglip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename to ours, dropping what is not the vision encoder (see from_siglip_name)."""
    return {ours: t for name, t in state.items() if (ours := from_siglip_name(name)) is not None}


# ------------------------------------------------------------------------------------------- files


def _weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a folder or bare file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError("vision.pretrained", f"not found: {path}")
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    index = path / HF_INDEX
    if not index.is_file():
        raise FileError(path, f"no {HF_WEIGHTS} (nor {HF_INDEX})")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FileError(index, f"unreadable index ({type(e).__name__}: {e})") from None
    return [path / shard for shard in shards]


def _tensors(path: Path) -> Iterator[tuple[Path, str, Any]]:
    """(file, name, handle) for every tensor of the checkpoint, without loading any."""
    safe_open = safetensors("vision.pretrained").safe_open
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield file, name, f
        except FileNotFoundError:
            raise FileError(file, "not found") from None
        except ConfigError:
            raise
        except Exception as e:  # safetensors' own errors (bad header, truncated file) have no common base
            raise FileError(file, f"not a readable safetensors file ({type(e).__name__}: {e})") from None


def _get(file: Path, f: Any, name: str) -> Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise FileError(file, f"cannot read {name} ({type(e).__name__}: {e})") from None


def _hf_config(path: Path) -> tuple[dict[str, Any], Path]:
    """The SiglipVisionConfig fields of config.json (a folder's, or the one beside a bare file)."""
    file = (path if path.is_dir() else path.parent) / HF_CONFIG
    if not path.exists():
        raise ConfigError("vision.pretrained", f"not found: {path}")
    if not file.is_file():
        raise FileError(path, f"no {HF_CONFIG} (a bare .safetensors needs one beside it)")
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FileError(file, f"unreadable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise FileError(file, "not a JSON object")
    if hf.get("model_type") == "siglip" or "vision_config" in hf:
        hf = {**(hf.get("vision_config") or {}), "nanollama": hf.get("nanollama")}
        hf.setdefault("model_type", "siglip_vision_model")
    if hf.get("model_type") != "siglip_vision_model":
        raise FileError(file, f"model_type {hf.get('model_type')!r} is not siglip or siglip_vision_model")
    return hf, file


def _square(value: Any, key: str, file: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise FileError(file, f"{key}={value!r}: only square images and patches are supported")
        value = value[0]
    if not isinstance(value, int):
        raise FileError(file, f"{key}={value!r} is not an integer")
    return value


def siglip_config(path: str | os.PathLike) -> VisionConfig:
    """Our config from a SigLIP config.json, before any weights load (e.g. to size the VLM's projector).
    select_layer is -1 unless our own export recorded another."""
    hf, file = _hf_config(Path(path))
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if hf["hidden_act"] != "gelu_pytorch_tanh":
        raise FileError(file, f"hidden_act={hf['hidden_act']!r} is not supported (gelu_pytorch_tanh only)")
    ours = hf.get("nanollama") if isinstance(hf.get("nanollama"), dict) else {}
    dim, hidden = hf["hidden_size"], hf["intermediate_size"]
    cfg = VisionConfig(
        image_size=_square(hf["image_size"], "image_size", file),
        patch_size=_square(hf["patch_size"], "patch_size", file),
        channels=hf["num_channels"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=0 if hidden == 4 * dim else hidden,
        norm_eps=float(hf["layer_norm_eps"]),
        select_layer=int(ours.get("select_layer", -1)),
        pretrained=str(path),
    )
    try:
        cfg.check()
    except ConfigError as e:
        raise FileError(file, f"not representable as our VisionEncoder ({e})") from None
    return cfg


def load_siglip(path: str | os.PathLike) -> tuple[VisionConfig, dict[str, Tensor]]:
    """Our config and state dict from a SigLIP folder (all blocks, unless our export recorded a
    truncation); weights are checked against the config as load_siglip_weights does."""
    cfg = siglip_config(path)
    state = _read_checked(Path(path), cfg, _shapes(cfg))
    return cfg, state


def _shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes for `cfg`, without building anything."""
    d, c, p, h = cfg.dim, cfg.channels, cfg.patch_size, cfg.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, c, p, p),
        "patch_embedding.bias": (d,),
        "position_embedding.weight": (cfg.n_patches, d),
    }
    block = {"mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h)}
    for name in _BLOCK_PARAMS:
        shape = block.get(name, (d, d) if name.endswith("proj.weight") else (d,))
        shapes |= {f"layers.{i}.{name}": shape for i in range(cfg.built_layers)}
    if cfg.select_layer == -1:
        shapes |= {"post_layernorm.weight": (d,), "post_layernorm.bias": (d,)}
    return shapes


def _read_checked(path: Path, cfg: VisionConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The tensors of `shapes` from a checkpoint, each with its shape. Blocks above a truncated encoder's
    last, and the post-norm it lacks, are skipped; a full encoder (select_layer -1) needs exactly its
    n_layers blocks, else the post-norm would apply to the wrong block's output."""
    state, where = _read_weights(path, lambda name: name in shapes)
    layers = [int(m[1]) for name in where if (m := _OURS_LAYER.fullmatch(name))]
    missing = [name for name in shapes if name not in state]
    if missing:  # named in the file's own layout, with or without `vision_model.`
        prefixed = any(theirs.startswith(_HF_PREFIX) for _, theirs in where.values())
        name = to_siglip_name(missing[0])
        name = name if prefixed else name.removeprefix(_HF_PREFIX)
        raise FileError(path, f"missing tensor {name} ({len(missing)} missing in all)")
    for name, shape in shapes.items():  # the first mismatch in the model's order
        if tuple(state[name].shape) != shape:
            file, theirs = where[name]
            raise ConfigError(
                "vision.pretrained",
                f"{file}: {theirs} has shape {tuple(state[name].shape)}, the encoder's is {shape}",
            )
    n_layers = max(layers, default=-1) + 1
    if cfg.select_layer == -1 and n_layers != cfg.built_layers:
        raise ConfigError(
            "vision.pretrained",
            f"{path}: {n_layers} layers, the encoder has {cfg.built_layers} (set select_layer to use fewer)",
        )
    return state


def _read_weights(path: Path, keep: Any) -> tuple[dict[str, Tensor], dict[str, tuple[Path, str]]]:
    """Our state dict from a checkpoint (only the names `keep` accepts, the others are never read), and
    the file and name there of every encoder tensor it holds (kept or not)."""
    state, where = {}, {}
    for file, name, f in _tensors(path):
        try:
            ours = from_siglip_name(name)
        except ConfigError:
            raise FileError(file, f"unexpected tensor {name} (not a SigLIP vision parameter)") from None
        if ours is None:
            continue
        where[ours] = file, name
        if keep(ours):
            state[ours] = _get(file, f, name)
    if not where:
        raise FileError(path, "no SigLIP vision tensors")
    return state, where


@torch.no_grad()
def load_siglip_weights(encoder: VisionEncoder, path: str | os.PathLike) -> int:
    """Copy a SigLIP checkpoint into `encoder` (in place, keeping its device and dtype); every tensor of
    the encoder must be in the file with the same shape. Returns the number of tensors loaded."""
    params = encoder.state_dict()
    shapes = {name: tuple(t.shape) for name, t in params.items()}
    state = _read_checked(Path(path), encoder.cfg, shapes)
    for name, t in state.items():
        params[name].copy_(t)
    return len(state)


def export_siglip(encoder: VisionEncoder, out: str | os.PathLike) -> Path:
    """Write `encoder` as an HF SiglipVisionModel folder (config.json + model.safetensors), atomically."""
    cfg = encoder.cfg
    state = {name: t.detach().cpu().contiguous() for name, t in encoder.state_dict().items()}
    if encoder.post_layernorm is None:  # truncated: HF always post-norms, so write a parameter-free one
        ref = state["position_embedding.weight"]
        state["post_layernorm.weight"] = torch.ones(cfg.dim, dtype=ref.dtype)
        state["post_layernorm.bias"] = torch.zeros(cfg.dim, dtype=ref.dtype)
    dtype = str(state["patch_embedding.weight"].dtype).removeprefix("torch.")
    hf = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.built_layers,
        "num_attention_heads": cfg.n_heads,
        "num_channels": cfg.channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
        "vision_use_head": False,  # we have no pooling head: HF would make a random one
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.select_layer != -1:
        hf["nanollama"] = {"select_layer": cfg.built_layers}
    with atomic_folder(out) as tmp:
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        safetensors("a SigLIP export").save_file(
            to_siglip_state_dict(state), tmp / HF_WEIGHTS, metadata={"format": "pt"}
        )
    return Path(out)
