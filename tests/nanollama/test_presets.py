"""`defaults:` presets: merge order, relative paths, cycles and missing files, unknown keys named with their
file, the resolved config.yaml, grids over presets, and the shipped presets in configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from src.apps.gssm.train import TrainConfig
from src.nanollama.config import ConfigError, build_config, load_config, read_yaml, to_yaml
from src.nanollama.launcher import load_launch
from src.nanollama.model.transformer import Transformer, TransformerConfig
from tests.conftest import ROOT, assert_bad_input, run_module

GSSM = "src/apps/gssm/configs/debug.yaml"


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_presets_merge_in_order_then_the_file_then_the_cli(tmp_path):
    write(tmp_path / "a.yaml", {"model": {"dim": 32, "n_heads": 2}, "optim": {"lr": 0.1, "steps": 10}})
    write(tmp_path / "b.yaml", {"model": {"dim": 48}, "optim": {"lr": 0.2}})
    top = write(tmp_path / "top.yaml", {"defaults": ["a.yaml", "b.yaml"], "optim": {"lr": 0.3}})
    cfg = load_config(TrainConfig, [f"config={top}", "optim.steps=7"])
    assert (cfg.model.dim, cfg.model.n_heads) == (48, 2)  # b over a, a's key b does not set kept
    assert (cfg.optim.lr, cfg.optim.steps) == (0.3, 7)  # the file over its presets, the CLI over all


def test_presets_nest_and_resolve_from_the_file_or_the_repository_root(tmp_path):
    write(tmp_path / "sub" / "inner.yaml", {"defaults": ["configs/models/cpu_4k.yaml"], "optim": {"lr": 0.5}})
    top = write(tmp_path / "top.yaml", {"defaults": ["sub/inner.yaml"]})  # relative to top.yaml
    cfg = load_config(TrainConfig, [f"config={top}"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.optim.lr) == (16, 1, 0.5)  # cpu_4k, from the root


def test_a_missing_preset_a_cycle_and_a_malformed_list_name_the_file(tmp_path):
    missing = write(tmp_path / "m.yaml", {"defaults": ["nope.yaml"]})
    with pytest.raises(ConfigError, match=r"m\.yaml: defaults: preset 'nope\.yaml' not found"):
        load_config(TrainConfig, [f"config={missing}"])
    write(tmp_path / "x.yaml", {"defaults": ["y.yaml"]})
    write(tmp_path / "y.yaml", {"defaults": ["x.yaml"]})
    with pytest.raises(
        ConfigError, match=r"y\.yaml: defaults: cycle of presets .*x\.yaml -> .*y\.yaml -> .*x"
    ):
        load_config(TrainConfig, [f"config={tmp_path / 'x.yaml'}"])
    scalar = write(tmp_path / "s.yaml", {"defaults": "x.yaml"})
    with pytest.raises(ConfigError, match=r"s\.yaml: defaults: must be a list of preset paths"):
        load_config(TrainConfig, [f"config={scalar}"])


def test_an_unknown_key_in_a_preset_names_the_preset(tmp_path):
    write(tmp_path / "bad.yaml", {"model": {"dimm": 3}})
    top = write(tmp_path / "top.yaml", {"defaults": ["bad.yaml"]})
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.dimm: unknown key"):
        load_config(TrainConfig, [f"config={top}"])


def test_bad_presets_exit_2_before_the_log_dir_exists(tmp_path):
    top = write(tmp_path / "top.yaml", {"defaults": [str(ROOT / GSSM), "missing.yaml"]})
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gssm.train", f"config={top}", f"orchestration.log_dir={log_dir}")
    assert_bad_input(out, "missing.yaml", log_dir)


def test_the_resolved_config_reproduces_the_run_alone(tmp_path):
    top = write(
        tmp_path / "top.yaml", {"defaults": [GSSM, "configs/models/cpu_27k.yaml"], "optim": {"lr": 0.01}}
    )
    cfg = load_config(TrainConfig, [f"config={top}"])
    resolved = write(tmp_path / "config.yaml", to_yaml(cfg))  # what the Monitor writes to the log dir
    assert "defaults" not in read_yaml(resolved)
    assert load_config(TrainConfig, [f"config={resolved}"]) == cfg
    assert (cfg.model.dim, cfg.data.seq_len, cfg.optim.lr) == (32, 64, 0.01)


def test_a_grid_crosses_presets_merged_before_the_file_s_own_keys(tmp_path):
    sweep = {
        "defaults": [GSSM],
        "launcher": {"log_dir": str(tmp_path / "sweep")},
        "grid": {
            "defaults": [["configs/models/cpu_4k.yaml"], "configs/models/cpu_27k.yaml"],
            "optim": {"lr": [0.001, 0.01]},
        },
        "model": {"n_layers": 3},  # the file's own key wins over every preset
    }
    path = write(tmp_path / "sweep.yaml", sweep)
    _, tasks, _ = load_launch(["script=src.apps.gssm.train", f"config={path}"])
    got = [(t.config.model.dim, t.config.model.n_layers, t.config.optim.lr) for t in tasks]
    assert got == [(16, 3, 0.001), (16, 3, 0.01), (32, 3, 0.001), (32, 3, 0.01)]
    assert tasks[0].config.data.seq_len == 64  # from the debug config, the file's own preset


def test_a_bad_preset_in_a_grid_is_refused_naming_it(tmp_path):
    write(tmp_path / "bad.yaml", {"model": {"dimm": 3}})
    sweep = {
        "defaults": [GSSM],
        "grid": {"defaults": [["bad.yaml"]]},
        "launcher": {"log_dir": str(tmp_path / "s")},
    }
    path = write(tmp_path / "sweep.yaml", sweep)
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.dimm: unknown key"):
        load_launch(["script=src.apps.gssm.train", f"config={path}"])
    sweep["grid"] = {"defaults": [["gone.yaml"]]}
    write(path, sweep)
    with pytest.raises(ConfigError, match=r"sweep\.yaml: grid\.defaults: defaults: preset 'gone\.yaml'"):
        load_launch(["script=src.apps.gssm.train", f"config={path}"])


def test_a_launcher_key_of_a_cluster_preset_is_named_with_its_file(tmp_path):
    write(tmp_path / "cluster.yaml", {"launcher": {"moed": "bash"}})
    path = write(tmp_path / "sweep.yaml", {"defaults": [GSSM, "cluster.yaml"]})
    with pytest.raises(ConfigError, match=r"cluster\.yaml: launcher\.moed"):
        load_launch(["script=src.apps.gssm.train", f"config={path}", f"launcher.log_dir={tmp_path / 's'}"])


MODEL_PRESETS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: p.stem)
def test_each_model_preset_states_its_true_parameter_count(path):
    stated = re.search(r"non-embedding parameters: ([\d,]+)", path.read_text())
    assert stated, f"{path.name} does not state its count"
    cfg = build_config(TransformerConfig, {**read_yaml(path)["model"], "vocab_size": 32})
    with torch.device("meta"):
        counts = Transformer(cfg).parameter_counts()
    assert counts["non_embedding"] == int(stated.group(1).replace(",", ""))


def test_the_ladder_spans_cpu_and_gpu_sizes():
    sizes = {}
    for path in MODEL_PRESETS:
        sizes[path.stem] = int(re.search(r"parameters: ([\d,]+)", path.read_text()).group(1).replace(",", ""))
    cpu = sorted(v for k, v in sizes.items() if k.startswith("cpu_"))
    assert cpu[0] < 10_000 and cpu[-1] > 1_000_000 and len(cpu) >= 6
    assert {k for k in sizes if k.startswith("gpu_")} == {"gpu_25m", "gpu_125m", "gpu_350m"}


@pytest.mark.parametrize("name", ["gssm_model_size", "gssm_data_size"])
def test_the_scaling_sweeps_load(name, tmp_path):
    argv = [
        "script=src.apps.gssm.train",
        f"config=configs/sweeps/{name}.yaml",
        f"launcher.log_dir={tmp_path}/s",
    ]
    if name == "gssm_data_size" and not (ROOT / "data" / "gssm_scaling" / "n64").is_dir():
        argv += [f"grid.data.path=[{tmp_path}/a,{tmp_path}/b]"]  # the datasets are made by hand
    sweep, tasks, _ = load_launch(argv)
    assert sweep.mode == "bash" and sweep.env == {"OMP_NUM_THREADS": "1"}  # from configs/clusters/cpu_local
    assert len({t.config.model.dim for t in tasks}) == (6 if name == "gssm_model_size" else 1)
    assert all(t.config.data.gssm.nodes[-1].state_dim == 32 for t in tasks)


@pytest.mark.parametrize("name", ["cpu_local", "gpu_single", "slurm_8gpu"])
def test_cluster_presets_hold_only_launcher_and_cluster_sections(name, tmp_path):
    data = read_yaml(ROOT / "configs" / "clusters" / f"{name}.yaml")
    assert set(data) == {"launcher", "cluster"}
    path = write(tmp_path / "s.yaml", {"defaults": [GSSM, f"configs/clusters/{name}.yaml"]})
    argv = ["script=src.apps.gssm.train", f"config={path}", f"launcher.log_dir={tmp_path}/s"]
    if name != "cpu_local":  # no GPU or SLURM here: the GPU presets are checked up to the device
        with pytest.raises(ConfigError, match=r"sbatch|cuda"):
            load_launch([*argv, "launcher=bash"] if name == "gpu_single" else argv)
        return
    sweep, tasks, _ = load_launch(argv)
    assert sweep.nproc_per_node == 2 and tasks[0].config.cluster.device == "cpu"
