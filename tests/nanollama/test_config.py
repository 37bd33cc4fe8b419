from dataclasses import dataclass, field

import pytest

from src.nanollama.config import ConfigError, build_config, load_config, parse_cli, read_yaml, to_yaml
from src.nanollama.optim import OptimConfig


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


# ----------------------------------------------------------------------------- input checked at start-up


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused_before_any_check(value):
    from src.nanollama.optim import OptimConfig

    with pytest.raises(ConfigError) as info:
        build_config(Outer, overrides=[f"lr={value}"])
    assert info.value.key == "lr" and "finite" in info.value.message
    for key in ("lr", "warmup"):  # warmup=inf used to reach int(inf) in OptimConfig.check
        with pytest.raises(ConfigError) as info:
            build_config(OptimConfig, overrides=[f"{key}={value}"])
        assert info.value.key == key


def test_a_section_given_a_plain_value_is_named():
    for data, overrides in (({"inner": 3}, []), ({}, ["inner=3"]), ({"inner": [1]}, [])):
        with pytest.raises(ConfigError) as info:
            build_config(Outer, data, overrides)
        assert info.value.key == "inner" and "mapping" in info.value.message


def test_empty_directory_duplicate_and_non_utf8_config_files_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    for text in ("", "# only a comment\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path} is empty"):
            load_config(Outer, [f"config={path}"])
    path.write_text("{}\n")  # explicitly empty: the defaults
    assert load_config(Outer, [f"config={path}"]) == Outer()
    with pytest.raises(ConfigError, match=f"{tmp_path} is a directory"):
        read_yaml(tmp_path)
    path.write_text("lr: 0.1\ninner:\n  dim: 4\n  names: [a]\n  dim: 8\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value) == f"config: {path}:5: duplicate key 'dim'"
    path.write_text("base: &base {dim: 4}\ninner:\n  <<: *base\n  dim: 8\n")  # a merge key may be overridden
    assert read_yaml(path)["inner"] == {"dim": 8}
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 at byte 9"):
        read_yaml(path)


@dataclass
class WithInputs(Outer):
    def check_inputs(self) -> None:
        if self.name == "absent":
            raise ConfigError("name", "reads a file that is not there")


@dataclass
class EvalWithInputs(WithInputs):
    checkpoint: str = ""


def test_load_config_calls_check_inputs_after_validate_and_subclasses_inherit_it():
    for cls in (WithInputs, EvalWithInputs):
        with pytest.raises(ConfigError, match="name: reads a file"):
            load_config(cls, ["name=absent"])
        with pytest.raises(ConfigError, match="inner.dim"):  # validate first
            load_config(cls, ["name=absent", "inner.dim=0"])
    assert build_config(WithInputs, overrides=["name=absent"]).name == "absent"  # build_config: pure


def test_a_value_split_at_a_space_is_named_with_its_cause():
    """`V='optim.groups={vision.: 0.0}'; train $V` reaches us as two arguments."""
    with pytest.raises(ConfigError, match=r"^optim.groups: its value seems split at a space") as error:
        parse_cli(["config=x.yaml", "optim.groups={vision.:", "0.0}"])
    assert "without spaces" in str(error.value)
    with pytest.raises(ConfigError, match=r"^oops: arguments must be key=value"):
        parse_cli(["oops"])
    spaceless = build_config(OptimConfig, overrides=['groups={"vision.":0.0}'])  # the documented form
    assert spaceless.groups == {"vision.": 0.0}
