"""A bad value's one-line error names the key that was given, not a sibling checked beside it."""

from __future__ import annotations

import importlib

import pytest

from src.nanollama.config import ConfigError, build_config, read_config
from tests.conftest import ROOT

CASES = [  # (app, the bad arguments, the key the error must start with)
    ("multiplication", ["train.latent.per_step=0"], "train.latent.per_step"),
    ("multiplication", ["train.latent.num_latent=-1"], "train.latent.num_latent"),
    ("multiplication", ["train.curriculum.max_stage=-1"], "train.curriculum.max_stage"),
    ("multiplication", ["train.internalize.smoothing=-1"], "train.internalize.smoothing"),
    ("multiplication", ["train.teacher_forcing.ramp_steps=0"], "train.teacher_forcing.ramp_steps"),
    ("multiplication", ["train.teacher_forcing.start_step=-1"], "train.teacher_forcing.start_step"),
    ("multiplication", ["evaluation.batch_size=0"], "evaluation.batch_size"),
    ("multiplication", ["data.k=3", "data.m=4", "evaluation.n_problems=405405"], "evaluation.n_problems"),
    ("dvae", ["masking.shape=linear", "masking.end=-0.5"], "masking.end"),
    ("dvae", ["masking.start=1.0"], "masking.start"),
    ("dvae", ["loss.kl.shape=linear", "loss.kl.end=-1"], "loss.kl.end"),
    ("dvae", ["quantiser.tau.end=0"], "quantiser.tau.end"),
    ("dvae", ["quantiser.noise.end=-1"], "quantiser.noise.end"),
    ("dvae", ["loss.mi_weight=-1"], "loss.mi_weight"),
    ("dvae", ["loss.tc_weight=-1"], "loss.tc_weight"),
    ("gpt", ["generation.max_new_tokens=-1"], "generation.max_new_tokens"),
    ("gssm", ["orchestration.profiler.warmup=-1"], "orchestration.profiler.warmup"),
]


@pytest.mark.parametrize("app, args, key", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_the_error_names_the_given_key(app, args, key):
    cls = importlib.import_module(f"src.apps.{app}.train").TrainConfig
    with pytest.raises(ConfigError) as error:
        build_config(cls, read_config(cls, ROOT / f"src/apps/{app}/configs/debug.yaml"), args)
    assert str(error.value).startswith(f"{key}: "), str(error.value)
