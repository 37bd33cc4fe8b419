from dataclasses import dataclass, field

import pytest

from src.nanollama.config import ConfigError, build_config, load_config, parse_cli, read_yaml, to_yaml


@dataclass
class Inner:
    dim: int = 8
    names: list[str] = field(default_factory=lambda: ["a"])

    def check(self) -> None:
        if self.dim <= 0:
            raise ConfigError("dim", f"must be positive, got {self.dim}")


@dataclass
class Outer:
    lr: float = 1e-3
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\ninner:\n  dim: 16\n")
    cfg = load_config(Outer, [f"config={path}", "inner.dim=32"])
    assert cfg.lr == 0.5  # yaml over default
    assert cfg.inner.dim == 32  # cli over yaml
    assert cfg.name == "run"  # default kept
    assert cfg.inner.names == ["a"]


def test_launcher_sections_are_ignored_by_runs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid: {lr: [1, 2]}\nlauncher: {name: x}\nlr: 0.1\n")
    assert load_config(Outer, [f"config={path}"]).lr == 0.1


@pytest.mark.parametrize(
    "data, overrides, key",
    [
        ({"lrr": 1.0}, [], "lrr"),  # unknown key
        ({}, ["inner.dimm=3"], "inner.dimm"),  # unknown nested key
        ({"lr": "fast"}, [], "lr"),  # wrong type
        ({}, ["inner.dim=-1"], "inner.dim"),  # bad value caught by check()
        ({"items": [{"dim": 1}, {"dim": 0}]}, [], "items.1.dim"),  # in a list of dataclasses
    ],
)
def test_errors_name_the_key(data, overrides, key):
    with pytest.raises(ConfigError) as info:
        build_config(Outer, data, overrides)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli(["lr"])


def test_resolved_yaml_reproduces_the_config(tmp_path):
    cfg = build_config(Outer, {"items": [{"dim": 3}]}, ["lr=0.25"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(Outer, [f"config={path}"]) == cfg
