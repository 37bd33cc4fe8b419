"""The app contract in code (app.py) and the setup every app's train() shares (trainer.start_run)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from src.nanollama.app import (
    RunConfig,
    TrainEntrypoint,
    Training,
    check_use_ema,
    set_vocab_size,
    train_entrypoint,
)
from src.nanollama.config import ConfigError, build_config
from src.nanollama.distributed import Cluster, ClusterConfig
from src.nanollama.model.transformer import TransformerConfig
from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.optim import OptimConfig
from src.nanollama.trainer import start_run, steps_in_epochs

APPS = sorted(p.parent.name for p in Path(__file__).parents[2].glob("src/apps/*/train.py"))


def test_every_app_exports_the_contract():
    assert {"gssm", "gpt", "bert", "dvae", "multiplication", "vlm"} <= set(APPS)
    for app in APPS:
        module = importlib.import_module(f"src.apps.{app}.train")
        main = module.main
        assert isinstance(main, TrainEntrypoint), app
        assert main.config_class is module.TrainConfig and issubclass(main.config_class, RunConfig), app
        assert main.build_training is module.build_training and main.train is module.train, app
        names = [f.name for f in dataclasses.fields(main.config_class)]
        assert names[:4] == ["orchestration", "cluster", "optim", "init"], app


def test_a_config_that_is_not_a_run_config_is_refused():
    @dataclasses.dataclass
    class Loose:
        x: int = 0

    with pytest.raises(TypeError, match="Loose must extend app.RunConfig"):
        train_entrypoint(Loose, lambda cfg: None, lambda *a: None)


def test_vocab_size_zero_takes_the_datas_and_another_is_refused():
    model = TransformerConfig(vocab_size=0)
    set_vocab_size(model, 37, "tokenizer")
    assert model.vocab_size == 37
    set_vocab_size(model, 37, "tokenizer")  # the same again is fine
    with pytest.raises(ConfigError, match=r"model.vocab_size: 37 != observed node's 12"):
        set_vocab_size(model, 12, "observed node")


def test_use_ema_needs_an_ema():
    check_use_ema(False, OptimConfig())
    check_use_ema(True, OptimConfig(ema_decay=0.99))
    with pytest.raises(ConfigError, match="evaluation.use_ema"):
        check_use_ema(True, OptimConfig())


def test_steps_in_epochs_counts_whole_optimizer_steps():
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        assert steps_in_epochs(7, cluster, 2, "1") == 3
        with pytest.raises(ConfigError, match="data.epochs: 2 epochs give 1 batches per rank"):
            steps_in_epochs(1, cluster, 2, "2")


# ----------------------------------------------------------------------------- start_run


class Counting:
    """A data stream with the loader protocol: enters, counts its batches, saves and restores its place."""

    def __init__(self):
        self.position, self.entered, self.closed = 0, False, False

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.closed = True

    def __next__(self):
        self.position += 1
        return torch.full((4, 1), float(self.position))

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1))


def toy_training(cfg: RunConfig, cluster: Cluster, loader: Counting, init: bool, calls: list) -> Training:
    calls.append(init)
    torch.manual_seed(0)
    model = toy_model()
    return Training(model, loader, lambda: next(loader), lambda m, x: (m(x) - 1).pow(2).mean())


def toy_config(log_dir: Path, **optim) -> RunConfig:
    cfg = build_config(RunConfig, {"orchestration": {"log_dir": str(log_dir)}, "cluster": {"device": "cpu"}})
    cfg.optim = build_config(OptimConfig, {"steps": 4, "lr": 0.1, "warmup": 0.0, **optim})
    return cfg


def run_toy(cfg: RunConfig, calls: list, steps: int) -> tuple[int, dict]:
    build = functools.partial(toy_training, calls=calls)
    with Cluster(cfg.cluster) as cluster, start_run(cfg, cluster, Counting(), build, toy_model) as run:
        assert run.loader.entered
        step = run.step
        while step < steps and not run.monitor.stop:
            loss, metrics = run.train_step(step)
            step = run.monitor.end_step(step + 1, loss, 4, **metrics)
        weights = {k: v.clone() for k, v in run.training.model.state_dict().items()}
    assert run.loader.closed
    return run.step, weights


def test_start_run_trains_resumes_and_closes_the_loader(tmp_path):
    cfg, calls = toy_config(tmp_path / "run", groups={"0.": 0.0}), []
    start, weights = run_toy(cfg, calls, steps=2)
    assert start == 0 and calls == [True]  # a fresh start loads init.checkpoint
    assert (tmp_path / "run" / "config.yaml").is_file()
    torch.manual_seed(0)
    first = toy_model()
    assert torch.equal(weights["0.weight"], first[0].weight)  # frozen by optim.groups before the wrap
    assert not torch.equal(weights["1.weight"], first[1].weight)  # trained
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["0000000002"]

    start, resumed = run_toy(cfg, calls, steps=4)
    assert start == 2 and calls == [True, False]  # a resume does not load the starting point again


def test_start_run_checks_init_before_the_log_dir_exists(tmp_path):
    cfg = toy_config(tmp_path / "run")
    cfg.init.checkpoint = str(tmp_path / "nowhere")
    with Cluster(cfg.cluster) as cluster:
        with pytest.raises(ConfigError, match="init.checkpoint"):
            with start_run(cfg, cluster, Counting(), functools.partial(toy_training, calls=[]), toy_model):
                pass
    assert not (tmp_path / "run").exists()


def test_the_init_check_builds_on_the_meta_device(tmp_path):
    source = toy_config(tmp_path / "source")
    run_toy(source, [], steps=1)
    cfg = toy_config(tmp_path / "run")
    cfg.init.checkpoint = str(tmp_path / "source")
    devices = []

    def check_model() -> nn.Module:
        model = toy_model()
        devices.append(next(model.parameters()).device.type)
        return model

    with Cluster(cfg.cluster) as cluster:
        build = functools.partial(toy_training, calls=[])
        with start_run(cfg, cluster, Counting(), build, check_model) as run:
            assert run.step == 0
    assert devices and set(devices) == {"meta"}  # the init check and the optim.groups check


def test_a_resume_does_not_need_its_starting_point_any_more(tmp_path):
    """A requeued fine-tune whose pretraining run was cleaned up: its own checkpoint wins."""
    source = toy_config(tmp_path / "source")
    run_toy(source, [], steps=1)
    cfg = toy_config(tmp_path / "run")
    cfg.init.checkpoint = str(tmp_path / "source")
    run_toy(cfg, [], steps=1)
    shutil.rmtree(tmp_path / "source")
    start, _ = run_toy(cfg, [], steps=2)
    assert start == 1


def test_optim_groups_are_checked_before_the_log_dir_exists(tmp_path):
    cfg = toy_config(tmp_path / "run", groups={"nosuch.": 0.0})
    with Cluster(cfg.cluster) as cluster:
        with pytest.raises(ConfigError, match="optim.groups"):
            with start_run(cfg, cluster, Counting(), functools.partial(toy_training, calls=[]), toy_model):
                pass
    assert not (tmp_path / "run").exists()


def test_a_last_step_that_reaches_no_trained_part_is_no_dead_end(tmp_path):
    """A batch that gives the trained parts no gradient (a text row for a projector-only VLM) is a
    legitimate step: the run still ends and saves."""
    cfg = toy_config(tmp_path / "run")

    def training(cfg, cluster, loader, init):
        t = toy_training(cfg, cluster, loader, init, [])
        loss = t.loss
        t.loss = lambda m, x: loss(m, x) * 0 if loader.position >= 3 else loss(m, x)  # step 3: no gradient
        return t

    with Cluster(cfg.cluster) as cluster, start_run(cfg, cluster, Counting(), training, toy_model) as run:
        step = run.step
        while step < 3:
            loss, metrics = run.train_step(step)
            step = run.monitor.end_step(step + 1, loss, 4, **metrics)
        assert metrics["grad_norm"] == 0.0
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["0000000003"]
