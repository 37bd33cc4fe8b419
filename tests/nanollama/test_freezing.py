"""Per-part learning rates and freezing (`optim.groups`): in-process on a toy VLM, under DDP and FSDP2 (two
gloo ranks, this file run as their worker), and end to end through the GPT app.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.nanollama.test_freezing ddp OUT
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.nanollama.config import ConfigError, build_config
from src.nanollama.distributed import Cluster, ClusterConfig
from src.nanollama.lr_finder import _NoMonitor
from src.nanollama.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    check_groups,
    freeze,
    lr_factor,
)
from src.nanollama.trainer import train_step
from tests.conftest import assert_bad_input, crash_after, losses, run_module

VOCAB, DIM = 13, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ToyVLM(nn.Module):
    """A VLM's layout: vision tower and LM with `layers` each, a projector between."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = Stack(2)
        self.projector = nn.Linear(DIM, DIM)
        self.lm = Stack(2)
        self.lm.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.lm.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image = self.projector(self.vision(image)).mean(1, keepdim=True)  # what every token sees
        return self.lm.output(self.lm(self.lm.tok_embeddings(tokens) + image))


def toy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    image, tokens = batch
    logits = model(image, tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def batches(seed: int = 1, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, DIM, generator=g), torch.randint(0, VOCAB, (4, 6), generator=g)) for _ in range(n)
    ]


def toy(seed: int = 0) -> ToyVLM:
    torch.manual_seed(seed)
    return ToyVLM()


def cfg(**kwargs) -> OptimConfig:
    base = {"lr": 1e-2, "steps": 10, "warmup": 3, "scheduler": "cosine", "min_lr_ratio": 0.1, "clip": 0.0}
    return build_config(OptimConfig, {**base, **kwargs})


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(
    model: nn.Module, c: OptimConfig, cluster: Cluster, steps: int
) -> tuple[torch.optim.Optimizer, list]:
    """`steps` train_steps on the toy batches; returns the optimizer and per step (group LRs, metrics)."""
    optimizer = build_optimizer(model, c, cluster.device_type)
    scheduler = build_scheduler(optimizer, c)
    monitor, data, loss_fn = _NoMonitor(), iter(batches()), partial(toy_loss, model)
    seen = []
    for step in range(steps):
        lrs = [g["lr"] for g in optimizer.param_groups]
        _, metrics = train_step(
            model, optimizer, scheduler, cluster, monitor, c, step, data.__next__, loss_fn
        )
        seen.append((lrs, metrics))
    return optimizer, seen


# --- in one process ---------------------------------------------------------------------------------


def test_frozen_part_gets_no_grad_no_state_and_stays_bit_identical():
    model, c = toy(), cfg(groups={"vision.": 0.0, "projector.": 2.0})
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        optimizer, _ = train(model, c, cluster, steps=5)
    frozen = {n for n in init if n.startswith("vision.")}
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, init[name]), name  # bit-identical
        else:
            assert not torch.equal(p, init[name]), name  # the rest trains
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen_ids = {id(p) for n, p in model.named_parameters() if n in frozen}
    assert not in_groups & frozen_ids and not set(map(id, optimizer.state)) & frozen_ids
    assert len(optimizer.state) == len(init) - len(frozen)

    # a backward leaves the frozen part without gradients: the grad norm is the trainable parts' alone
    toy_loss(model, batches()[0]).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    from src.nanollama.optim import clip_grad_norm

    manual = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters() if p.grad is not None))
    assert clip_grad_norm(model, 0.0) == pytest.approx(manual)
    assert freeze(model, c) == sorted(frozen, key=list(init).index)  # idempotent, in model order


def test_group_lrs_follow_the_schedule_times_their_multiplier():
    groups = {"vision.": 0.1, "projector.": 20.0, "lm.layers.0.": 0.5}
    model, c = toy(), cfg(groups=groups)
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        optimizer, seen = train(model, c, cluster, steps=7)  # warmup (3 steps) and into the cosine
    mults = [g["lr_mult"] for g in optimizer.param_groups]
    assert sorted(set(mults)) == [0.1, 0.5, 1.0, 20.0]
    for step, (lrs, metrics) in enumerate(seen):
        factor = lr_factor(step, c)
        assert lrs == pytest.approx([c.lr * m * factor for m in mults], rel=1e-12)
        assert metrics["lr"] == pytest.approx(c.lr * factor, rel=1e-12)  # the base LR, not the first group's
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            want = next((m for pre, m in groups.items() if name.startswith(pre)), 1.0)
            assert group["lr_mult"] == want, name
            assert group["weight_decay"] == (c.weight_decay if p.ndim >= 2 else 0.0), name


def test_logged_lr_is_the_base_lr_when_no_part_has_multiplier_one():
    model, c = toy(), cfg(groups={"": 0.5})  # the empty prefix matches every parameter
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        _, seen = train(model, c, cluster, steps=3)
    assert [m["lr"] for _, m in seen] == pytest.approx([c.lr * lr_factor(s, c) for s in range(3)])


def test_longest_prefix_wins():
    from src.nanollama.optim import lr_multiplier

    groups = {"lm.": 2.0, "lm.layers.": 3.0, "lm.layers.0.": 0.5, "lm.layers.1.": 0.0}
    assert lr_multiplier("lm.layers.0.fc.weight", groups) == 0.5
    assert lr_multiplier("lm.layers.1.fc.weight", groups) == 0.0
    assert lr_multiplier("lm.layers.10.fc.weight", groups) == 3.0  # "lm.layers.1." is no prefix of it
    assert lr_multiplier("lm.output.weight", groups) == 2.0
    assert lr_multiplier("vision.layers.0.fc.weight", groups) == 1.0
    model = toy()
    freeze(model, cfg(groups=groups))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("lm.layers.1.") for n in frozen)


def test_no_groups_keeps_the_two_groups_of_before():
    model = toy()
    optimizer = build_optimizer(model, cfg(), "cpu")
    assert [(g["weight_decay"], g["lr_mult"], g["lr"]) for g in optimizer.param_groups] == [
        (0.1, 1.0, 1e-2),
        (0.0, 1.0, 1e-2),
    ]
    assert all(p.requires_grad for p in model.parameters())


def test_check_groups_on_a_meta_model():
    from src.nanollama.model.transformer import Transformer, TransformerConfig

    with torch.device("meta"):
        vlm = ToyVLM()
        gpt = Transformer(TransformerConfig(dim=16, n_layers=2, n_heads=2, vocab_size=32))
    check_groups(vlm, cfg(groups={"vision.": 0.0, "projector.": 20.0, "lm.layers.0.": 0.5}))
    check_groups(gpt, cfg(groups={"layers.0.": 0.0, "output.": 2.0}))
    assert all(p.is_meta for p in gpt.parameters())
    with pytest.raises(ConfigError) as err:
        check_groups(vlm, cfg(groups={"vision.": 0.0, "visoin.": 1.0}))
    assert (
        err.value.key == "optim.groups"
        and err.value.message == "prefix 'visoin.' matches no parameter of the model"
    )
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        check_groups(vlm, cfg(groups={"": 0.0}))


def test_tied_parameters_must_agree():
    model = toy()
    model.lm.output.weight = model.lm.tok_embeddings.weight
    check_groups(model, cfg(groups={"lm.": 2.0}))
    with pytest.raises(
        ConfigError, match=r"tied parameter .*lm.tok_embeddings.weight: 1, lm.output.weight: 2"
    ):
        check_groups(model, cfg(groups={"lm.output.": 2.0}))


@pytest.mark.parametrize(
    "groups, text",
    [
        ({"vision.": -0.5}, "'vision.': the LR multiplier must be finite and >= 0, got -0.5"),
        ({"vision.": math.nan}, "must be finite"),
        ({"vision.": math.inf}, "must be finite"),
        ({"vision.": 1e40}, "overflows float32"),
    ],
)
def test_bad_multipliers_are_config_errors(groups, text):
    with pytest.raises(ConfigError) as err:
        cfg(groups=groups)
    assert err.value.key == "groups" and text in err.value.message


# --- two ranks: DDP and FSDP2 -----------------------------------------------------------------------


GROUPS = {"vision.": 0.0, "projector.": 2.0, "lm.layers.0.": 0.5}


def worker(parallelism: str, out: Path) -> None:
    """Both ranks train the same batches: the result must equal one process's, the frozen part its init."""
    from torch.distributed.fsdp import FSDPModule

    c = cfg(groups=GROUPS)
    with Cluster(ClusterConfig(device="cpu", parallelism=parallelism)) as cluster:
        model = toy()
        check_groups(model, c)
        frozen = freeze(model, c)  # before wrapping: DDP registers only what requires grad
        wrapped = cluster.wrap(model)
        units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        train(wrapped, c, cluster, steps=4)
        weights = {n: full(p).tolist() for n, p in model.named_parameters()}
        late = ""
        if parallelism == "ddp":  # frozen only after DDP wrapped it: refused, naming the fix
            try:
                build_optimizer(cluster.wrap(toy()), c, "cpu")
            except RuntimeError as e:
                late = str(e)
        if cluster.is_main:
            out.write_text(json.dumps({"weights": weights, "frozen": frozen, "units": units, "late": late}))


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_freeze_and_scale_like_one_process(tmp_path, parallelism):
    out = tmp_path / "result.json"
    run = run_module("tests.nanollama.test_freezing", parallelism, str(out), nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())

    model, init = toy(), {n: p.detach().clone() for n, p in toy().named_parameters()}
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        freeze(model, cfg(groups=GROUPS))
        train(model, cfg(groups=GROUPS), cluster, steps=4)
    assert result["frozen"] == [n for n in init if n.startswith("vision.")]
    for name, p in model.named_parameters():
        got = torch.tensor(result["weights"][name])
        if name.startswith("vision."):
            assert torch.equal(got, init[name]), name
        else:
            assert not torch.equal(got, init[name]), name
            torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)
    if parallelism == "fsdp":  # every block of both `layers` lists is a unit, then the root
        blocks = [f"{part}.layers.{i}" for part in ("vision", "lm") for i in range(2)]
        assert sorted(result["units"]) == sorted(["", *blocks])
    else:
        assert "before cluster.wrap" in result["late"]


# --- the GPT app, end to end ------------------------------------------------------------------------

CONFIG = "config=src/apps/gpt/configs/debug.yaml"
GPT = [
    "model.dim=32",
    "model.n_layers=2",
    "data.seq_len=32",
    "data.batch_size=8",
    "optim.warmup=2",
    "orchestration.logging.period=1",
    "evaluation.batches=2",
    "evaluation.batch_size=8",
    "evaluation.period=100",
    "generation.period=100",
    "orchestration.checkpoint.keep_only=0",
    "optim.groups={layers.0.: 0.0, output.: 2.0}",
]


def gpt_train(log_dir: Path, *args: str, nproc: int = 1) -> None:
    out = run_module(
        "src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", *GPT, *args, nproc=nproc
    )
    assert out.returncode == 0, out.stderr[-3000:]


def final_weights(log_dir: Path) -> dict[str, torch.Tensor]:
    from src.nanollama.monitor.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(log_dir / "checkpoints")[-1] / "model.pt", weights_only=True)


def gpt_init(*args: str) -> dict[str, torch.Tensor]:
    """The weights a fresh build of the run's config starts from (same seed)."""
    from src.apps.gpt.train import TrainConfig, build_model
    from src.nanollama.config import load_config

    model_cfg = load_config(TrainConfig, [CONFIG, *GPT, *args])
    return build_model(model_cfg, training=True, device=torch.device("cpu")).state_dict()


def assert_frozen_at_init(weights: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> None:
    frozen = [k for k in init if k.startswith("layers.0.") and "freqs" not in k]
    assert frozen
    for k in frozen:
        assert torch.equal(weights[k], init[k]), k
    trained = [k for k in init if k.startswith("layers.1.") and init[k].ndim >= 2] + ["output.weight"]
    assert all(not torch.equal(weights[k], init[k]) for k in trained), trained


@pytest.mark.slow
def test_gpt_frozen_layer_stays_at_init_and_resumes_exactly(tmp_path):
    from src.nanollama.monitor.logger import read_jsonl

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["optim.steps=6", "orchestration.checkpoint.period=3"]
    gpt_train(straight, *args)
    crash_after(straight, resumed, 3)
    gpt_train(resumed, *args)
    assert losses(resumed) == losses(straight)  # exactly, step by step
    assert "training from step 3 to 6" in (resumed / "logs" / "rank_0.log").read_text()
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_frozen_at_init(a, gpt_init(*args))
    opt = build_config(OptimConfig, {"steps": 6, "lr": 3e-3, "warmup": 2, "min_lr_ratio": 0.1})
    lrs = [r["lr"] for r in read_jsonl(straight / "metrics" / "raw_0.jsonl")]
    assert lrs == pytest.approx([opt.lr * lr_factor(s, opt) for s in range(6)])  # the base LR


@pytest.mark.slow
def test_gpt_two_ranks_keep_the_frozen_layer_at_init(tmp_path):
    """DDP registers parameters when it wraps: the app freezes before (FSDP is covered by the VLM's test)."""
    args = ["optim.steps=4", "cluster.parallelism=ddp"]
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", *GPT, *args, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_frozen_at_init(final_weights(log_dir), gpt_init(*args))


@pytest.mark.parametrize(
    "groups, needle",
    [("{layers.0.: -1.0}", "optim.groups: 'layers.0.'"), ("{layers.0.: nope}", "optim.groups.layers.0.")],
)
def test_gpt_bad_multiplier_exits_2_with_one_line_and_no_log_dir(tmp_path, groups, needle):
    log_dir = tmp_path / "run"
    out = run_module(
        "src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", f"optim.groups={groups}"
    )
    assert_bad_input(out, needle, log_dir)


def test_gpt_prefix_matching_nothing_exits_2(tmp_path):
    out = run_module(
        "src.apps.gpt.train", CONFIG, f"orchestration.log_dir={tmp_path / 'run'}", *GPT[:-1], "optim.steps=2",
        "optim.groups={layer.0.: 0.0}",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "optim.groups: prefix 'layer.0.' matches no parameter of the model" in out.stderr


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
