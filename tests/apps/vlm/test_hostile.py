"""Hostile-input regressions for the VLM app: a SigLIP folder whose weights are corrupt or do not match its
config.json, a mixture whose epoch caps end before `optim.steps`, a resume that adds or drops an
`optim.groups` prefix, and a 16-bit grey PNG."""

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import assert_bad_input, run_module

pytest.importorskip("sklearn")
CONFIG = "config=src/apps/vlm/configs/debug.yaml"
TINY = ["model.dim=32", "vision.dim=16", "data.batch_size=16", "evaluation.samples=4", "evaluation.period=0"]


def train(log_dir, *args):
    return run_module("src.apps.vlm.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args)


def export(folder, dim: int):
    from src.nanollama.model.vision import VisionConfig, VisionEncoder, export_siglip

    cfg = VisionConfig(image_size=16, patch_size=4, dim=dim, n_layers=2, n_heads=4)
    export_siglip(VisionEncoder(cfg), folder)


@pytest.fixture
def siglip(tmp_path):
    pytest.importorskip("safetensors")
    folder = tmp_path / "siglip"
    export(folder, 16)
    return folder


def test_corrupt_pretrained_weights_exit_2_before_the_log_dir(tmp_path, siglip):
    (siglip / "model.safetensors").write_bytes(b"garbage" * 10)
    log_dir = tmp_path / "run"
    out = train(log_dir, "optim.steps=2", f"vision.pretrained={siglip}")
    assert_bad_input(out, "model.safetensors", log_dir)


def test_pretrained_weights_not_matching_their_config_exit_2_before_the_log_dir(tmp_path, siglip):
    wide = tmp_path / "wide"
    export(wide, 32)
    shutil.copy(wide / "model.safetensors", siglip / "model.safetensors")  # config.json still says 16
    log_dir = tmp_path / "run"
    out = train(log_dir, "optim.steps=2", f"vision.pretrained={siglip}")
    assert_bad_input(out, "vision.pretrained", log_dir)


def test_epoch_caps_shorter_than_the_run_exit_2_before_the_log_dir(tmp_path):
    log_dir = tmp_path / "run"
    shapes = "data.datasets=[{name: s, kind: shapes, epochs: 1}]"
    sizes = ["data.seq_len=64", "data.shapes.train_size=40", "data.shapes.valid_size=2"]
    out = train(log_dir, shapes, *sizes, "optim.steps=10")  # 40 samples, 16 a batch: 2 steps
    assert_bad_input(out, "optim.steps", log_dir)


def test_a_resume_that_adds_or_drops_a_group_is_refused(tmp_path):
    """optim.groups is compared whole: an added or dropped prefix is a change (flattened, it slipped by)."""
    from src.nanollama.monitor.run_config import RESUME_FIXED, config_changes

    saved = {"optim": {"groups": {"vision.": 0.0}, "lr": 1e-3}}
    for groups in ({"vision.": 0.0, "lm.": 2.0}, {}):
        ours = {"optim": {"groups": groups, "lr": 2e-3}}
        changes = {k: (old, new) for k, old, new in config_changes(saved, ours)}
        assert changes["optim.groups"] == ({"vision.": 0.0}, groups) and "optim.groups" in RESUME_FIXED
    assert "optim.groups" not in dict((k, 0) for k, *_ in config_changes(saved, saved))


def test_a_16_bit_grey_png_keeps_its_grey(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from src.apps.vlm.generate import read_png

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((5, 7), 32768, dtype=np.uint16)).save(path)
    image = read_png(str(path))
    assert image.shape == (5, 7, 3)
    torch.testing.assert_close(torch.from_numpy(image), torch.full((5, 7, 3), 0.5), atol=1e-3, rtol=0)
