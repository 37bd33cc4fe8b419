"""Hugging Face interop: our Transformer <-> a `LlamaForCausalLM` folder (config.json + model.safetensors).

    python -m src.nanollama.hf export ckpt=<checkpoint dir> out=<folder> [ema=true]
    python -m src.nanollama.hf import hf=<folder> out=<checkpoint dir>

Our parameters have HF Llama's shapes and RoPE convention, so conversion is a pure renaming of
tensors. config.json also carries our full TransformerConfig under "nanollama" (HF keeps unknown
keys), so that a round trip gives back the same config, down to the attention backend; an HF folder
without it (or whose HF fields were edited since) is read from the HF fields alone. RoPE scaling:
linear and yarn are HF's rope types of those names, static NTK is plain RoPE with its larger base
(`to_hf_rope`). Export needs only safetensors and json; nothing here imports transformers, which
training never needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from .config import ConfigError, build_config, cli_main, to_dict
from .model.io import (
    EMA_WEIGHTS,
    HF_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    WEIGHTS,
    atomic_folder,
    check_weights,
    load_model_config,
    load_weights,
    safetensors,
    save_model,
)
from .model.rope import RopeScaling, ntk_theta, rope_frequencies
from .model.transformer import TransformerConfig

# Our RoPE tables grow on demand: this only tells HF tools a usable context length.
MAX_POSITION_EMBEDDINGS = 4096
# Keys of HF's rope_scaling that our RoPE cannot represent, unless they hold the value that changes nothing.
_HF_ROPE_NEUTRAL = {
    "attention_factor": None,
    "mscale": None,
    "mscale_all_dim": None,
    "truncate": True,
    "partial_rotary_factor": 1.0,
}

# Whole-name renamings, then the module names inside `layers.{i}.` (ours -> HF's).
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn": "self_attn",
    "mlp": "mlp",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(.+)")
# Buffers that old HF checkpoints saved; recomputed by both sides.
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


# ---------------------------------------------------------------------------------------------- names


def to_hf_name(name: str) -> str:
    """Our parameter name -> HF LlamaForCausalLM's (e.g. layers.0.attn_norm.weight ->
    model.layers.0.input_layernorm.weight)."""
    if name in _TOP:
        return _TOP[name]
    m = _OURS_LAYER.fullmatch(name)
    if m is None or m[2] not in _BLOCK:
        raise ConfigError(name, "not a parameter of the nanollama Transformer")
    return f"model.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"


def from_hf_name(name: str) -> str:
    """HF LlamaForCausalLM's parameter name -> ours; the exact inverse of to_hf_name."""
    for ours, theirs in _TOP.items():
        if name == theirs:
            return ours
    m = _HF_LAYER.fullmatch(name)
    module = {theirs: ours for ours, theirs in _BLOCK.items()}.get(m[2]) if m else None
    if module is None:
        raise ConfigError(name, "not a parameter of HF LlamaForCausalLM")
    return f"layers.{m[1]}.{module}.{m[3]}"


def to_hf_state_dict(state: dict[str, Tensor], tie_embeddings: bool) -> dict[str, Tensor]:
    """Rename to HF; tied models drop lm_head (safetensors refuses shared tensors, HF re-ties it)."""
    renamed = {to_hf_name(name): t.contiguous() for name, t in state.items()}
    if tie_embeddings:
        renamed.pop("lm_head.weight", None)
    return renamed


def from_hf_state_dict(state: dict[str, Tensor], tie_embeddings: bool) -> dict[str, Tensor]:
    """Rename to ours; a tied model's output shares the embedding, as in our own state dicts."""
    renamed = {from_hf_name(name): t for name, t in state.items() if not _HF_IGNORED.fullmatch(name)}
    if tie_embeddings and "tok_embeddings.weight" in renamed:
        renamed["output.weight"] = renamed["tok_embeddings.weight"]
    return renamed


# --------------------------------------------------------------------------------------------- config


def to_hf_config(cfg: TransformerConfig, dtype: str = "float32") -> dict[str, Any]:
    """A LlamaConfig as config.json content; bidirectional models have no LlamaForCausalLM form."""
    if not cfg.causal:
        raise ConfigError("model.causal", "false (bidirectional): LlamaForCausalLM is causal, cannot export")
    if cfg.sliding_window:
        raise ConfigError(
            "model.sliding_window", f"{cfg.sliding_window}: Llama has no sliding window, cannot export"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        **to_hf_rope(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,  # no tokenizer comes with the model: Llama's defaults (1, 2) would lie
        "eos_token_id": None,
        "torch_dtype": dtype,
        "nanollama": to_dict(cfg),
    }


def to_hf_rope(cfg: TransformerConfig) -> dict[str, Any]:
    """rope_theta, rope_scaling and max_position_embeddings of a LlamaConfig with our RoPE's exact tables.

    linear and yarn are HF's rope types of the same name (same formulas, HF's defaults for the rest);
    static NTK is plain RoPE with a larger base, which is how it is exported (HF's "dynamic" NTK
    recomputes the base from the sequence length, a different function). rope_scaling, not
    rope_parameters: transformers 4 reads only the former, 5 reads either.
    """
    scaling = RopeScaling.of(cfg)
    if scaling.plain or scaling.kind == "ntk":
        theta = cfg.rope_theta if scaling.plain else ntk_theta(cfg.rope_theta, scaling.factor, cfg.head_dim)
        return {"rope_theta": theta, "rope_scaling": None, "max_position_embeddings": MAX_POSITION_EMBEDDINGS}
    hf_scaling: dict[str, Any] = {"rope_type": scaling.kind, "factor": scaling.factor}
    max_positions = MAX_POSITION_EMBEDDINGS
    if scaling.kind == "yarn":
        hf_scaling["original_max_position_embeddings"] = scaling.original_length
        hf_scaling |= {"beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
        # transformers 4 takes yarn's factor as max_position_embeddings / original: make them agree.
        max_positions = round(scaling.factor * scaling.original_length)
    return dict(rope_theta=cfg.rope_theta, rope_scaling=hf_scaling, max_position_embeddings=max_positions)


def _hf_rope(hf: dict[str, Any], file: Path) -> dict[str, Any]:
    """Our rope_* fields from a LlamaConfig dict; transformers 5 writes `rope_parameters`, 4 writes
    `rope_theta` + `rope_scaling`. Only what our tables reproduce exactly: default, linear, yarn."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind not in ("default", "linear", "yarn"):
        raise ConfigError("hf", f"{file}: rope type {kind!r} is not supported (default, linear, yarn only)")
    for key, neutral in _HF_ROPE_NEUTRAL.items():
        if rope.get(key, hf.get(key, neutral)) != neutral:
            value = rope.get(key, hf.get(key))
            raise ConfigError("hf", f"{file}: rope type {kind!r} with {key}={value!r} is not supported")
    if kind == "default":
        return fields
    if rope.get("factor") is None:
        raise ConfigError("hf", f"{file}: rope type {kind!r} without a factor is not supported")
    fields |= {"rope_scaling": kind, "rope_factor": float(rope["factor"])}
    if kind == "yarn":  # HF's defaults where a key is absent
        original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        fields["rope_original_length"] = int(original or hf.get("max_position_embeddings", 0))
        fields["rope_beta_fast"] = float(rope.get("beta_fast") or 32)
        fields["rope_beta_slow"] = float(rope.get("beta_slow") or 1)
    return fields


def from_hf_config(hf: dict[str, Any], file: Path) -> TransformerConfig:
    """Our config from a LlamaConfig dict, refusing what our model cannot represent."""
    if hf.get("model_type") != "llama":
        raise ConfigError("hf", f"{file}: model_type {hf.get('model_type')!r} is not llama")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError("hf", f"{file}: {key}={hf[key]!r} is not supported (needs {ok!r})")
    try:
        dim, n_heads, hidden = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
        kv_heads = hf.get("num_key_value_heads") or n_heads
        derived = TransformerConfig(
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=0 if kv_heads == n_heads else kv_heads,
            ffn_dim=0 if TransformerConfig(dim=dim).hidden_dim == hidden else hidden,
            **_hf_rope(hf, file),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConfigError("hf", f"{file}: missing {e.args[0]}") from None
    if (hf.get("head_dim") or dim // n_heads) * n_heads != dim:
        raise ConfigError("hf", f"{file}: head_dim * num_attention_heads != hidden_size is not supported")
    try:
        derived.check()
        if derived.vocab_size <= 0:
            raise ConfigError("vocab_size", f"must be positive, got {derived.vocab_size}")
    except ConfigError as e:
        raise ConfigError("hf", f"{file}: not representable as our model ({e})") from None
    saved = _saved_config(hf)
    return saved if saved is not None and _same_model(saved, derived) else derived


def _saved_config(hf: dict[str, Any]) -> TransformerConfig | None:
    """Our own config, kept in config.json by export; None when absent or unreadable."""
    if not isinstance(hf.get("nanollama"), dict):
        return None
    try:
        return build_config(TransformerConfig, hf["nanollama"])
    except ConfigError:
        return None


def _same_model(a: TransformerConfig, b: TransformerConfig) -> bool:
    """Same computation (fields like attention, init_std or multiple_of may differ; RoPE compares by
    its frequencies, so an NTK model exported as plain RoPE with a larger base is the same model)."""
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps")
    keys += ("tie_embeddings", "causal", "sliding_window")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and _same_rope(a, b)


def _same_rope(a: TransformerConfig, b: TransformerConfig) -> bool:
    freq_a, factor_a = rope_frequencies(a.head_dim, a.rope_theta, RopeScaling.of(a))
    freq_b, factor_b = rope_frequencies(b.head_dim, b.rope_theta, RopeScaling.of(b))
    return factor_a == factor_b and freq_a.shape == freq_b.shape and bool((freq_a == freq_b).all())


# ---------------------------------------------------------------------------------------------- files


def read_hf_config(folder: Path) -> dict[str, Any]:
    file = folder / HF_CONFIG
    if not file.is_file():
        raise ConfigError("hf", f"no {HF_CONFIG} in {folder}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("hf", f"{file}: invalid JSON ({e})") from None


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    load_file = safetensors().load_file
    if (folder / HF_WEIGHTS).is_file():
        return load_file(folder / HF_WEIGHTS)
    if not (folder / HF_INDEX).is_file():
        raise ConfigError("hf", f"no {HF_WEIGHTS} (nor {HF_INDEX}) in {folder}")
    shards = sorted(set(json.loads((folder / HF_INDEX).read_text())["weight_map"].values()))
    return {name: t for shard in shards for name, t in load_file(folder / shard).items()}


# ------------------------------------------------------------------------------------------- commands


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> Path:
    """Write a checkpoint folder of the core Transformer as an HF LlamaForCausalLM folder; `ema`: its EMA
    weights (`ema.pt`, from a run with `optim.ema_decay` > 0) instead of the trained ones."""
    name = EMA_WEIGHTS if ema else WEIGHTS
    with atomic_folder(out) as tmp:
        cfg = load_model_config(ckpt, key="ckpt")
        to_hf_config(cfg)  # refuse a bidirectional model before reading its weights
        if ema and not (Path(ckpt) / EMA_WEIGHTS).is_file():
            raise ConfigError("ema", f"no {EMA_WEIGHTS} in {ckpt} (its run had optim.ema_decay=0)")
        state = load_weights(ckpt, key="ckpt", name=name)
        check_weights(cfg, state, str(Path(ckpt) / name))
        dtype = str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")
        (tmp / HF_CONFIG).write_text(json.dumps(to_hf_config(cfg, dtype), indent=2) + "\n")
        tensors = to_hf_state_dict(state, cfg.tie_embeddings)
        safetensors().save_file(tensors, tmp / HF_WEIGHTS, metadata={"format": "pt"})
    return Path(out)


def import_hf(hf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write an HF Llama folder as a checkpoint folder of ours: model.pt + model.yaml."""
    folder = Path(hf)
    with atomic_folder(out) as tmp:
        if not folder.is_dir():
            raise ConfigError("hf", f"folder not found: {folder}")
        cfg = from_hf_config(read_hf_config(folder), folder / HF_CONFIG)
        state = from_hf_state_dict(read_hf_weights(folder), cfg.tie_embeddings)
        check_weights(cfg, state, str(folder))
        save_model(tmp, cfg, state)
    return Path(out)


@dataclass
class ExportArgs:
    ckpt: str = ""  # a checkpoint folder: model.pt, with model.yaml or ../../config.yaml
    out: str = ""  # the HF folder to create
    ema: bool = False  # export the EMA of the weights (ema.pt) instead of model.pt

    def check(self) -> None:
        _check_required(self)
        safetensors("src.nanollama.hf export")


@dataclass
class ImportArgs:
    hf: str = ""  # an HF Llama folder: config.json + model.safetensors
    out: str = ""  # the checkpoint folder to create

    def check(self) -> None:
        _check_required(self)
        safetensors("src.nanollama.hf import")


def _check_required(args: Any) -> None:
    for f in dataclasses.fields(args):
        if f.type in ("str", str) and not getattr(args, f.name):
            raise ConfigError(f.name, "required")


VERBS: dict[str, tuple[type, Callable[..., Path]]] = {
    "export": (ExportArgs, export_hf),
    "import": (ImportArgs, import_hf),
}


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    verb = argv[0] if argv else ""
    if verb not in VERBS:
        raise ConfigError("verb", f"first argument must be one of {', '.join(VERBS)}, got {verb!r}")
    for arg in argv[1:]:
        if "=" not in arg:
            raise ConfigError(arg, "arguments must be key=value")
    cls, command = VERBS[verb]
    args = build_config(cls, overrides=argv[1:])
    out = command(**dataclasses.asdict(args))
    print(f"{verb}: wrote {out}")


if __name__ == "__main__":
    main()
