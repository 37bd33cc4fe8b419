"""Optional dependencies: a feature whose extra is missing exits 2 with one line naming the
`pip install -e ".[extra]"` to run, before any log dir exists; never an ImportError traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from src.nanollama.config import ConfigError, section
from src.nanollama.extras import MissingExtra, require
from tests.conftest import ROOT, assert_bad_input, child_env

# ------------------------------------------------------------------------------------------ require


def test_require_returns_the_module():
    assert require("json", "text") is json
    assert require("json.decoder", "text").JSONDecoder is json.JSONDecoder


@pytest.mark.parametrize("module", ["nanollama_no_such_module", "json.no_such_submodule"])
def test_a_missing_module_is_bad_input_naming_the_extra(module):
    with pytest.raises(ConfigError) as e:
        require(module, "text", "kind=tiktoken")
    assert isinstance(e.value, MissingExtra) and e.value.extra == "text"
    assert str(e.value) == f'kind=tiktoken needs {module.split(".")[0]}: pip install -e ".[text]"'


def test_a_blocked_module_and_a_missing_parent_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # what the process tests below do
    for name in [m for m in sys.modules if m.startswith("tiktoken.")]:  # imported by an earlier test
        monkeypatch.delitem(sys.modules, name)
    for module in ("tiktoken", "tiktoken.load"):
        with pytest.raises(MissingExtra, match=r'^tiktoken is not installed: pip install -e "\.\[text\]"$'):
            require(module, "text")


def test_the_feature_gets_the_full_key_of_its_section():
    with pytest.raises(MissingExtra) as e, section("tokenizer"):
        require("nanollama_no_such_module", "text", "kind=tiktoken")
    assert e.value.key == "tokenizer.kind=tiktoken"
    assert str(e.value).startswith("tokenizer.kind=tiktoken needs nanollama_no_such_module: pip install")


def test_another_missing_module_inside_it_is_a_broken_install_and_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the module itself (or a package above or below it) missing means "install the extra"."""
    (tmp_path / "nanollama_broken.py").write_text("import nanollama_not_a_dependency\n")
    (tmp_path / "nanollama_refusing.py").write_text("raise ImportError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="nanollama_not_a_dependency"):
        require("nanollama_broken", "text")
    with pytest.raises(MissingExtra, match=r'nanollama_refusing: pip install -e "\.\[vision\]"'):
        require("nanollama_refusing", "vision", "x")


# -------------------------------------------------------------------- real runs, the module blocked

CASES = {
    "text": (
        "tiktoken",
        "src.apps.gpt.train",
        [
            "config=src/apps/gpt/configs/debug.yaml",
            "tokenizer.kind=tiktoken",
            "tokenizer.path=ranks.tiktoken",
        ],
        'error: tokenizer.kind=tiktoken needs tiktoken: pip install -e ".[text]"',
    ),
    "vision": (
        "sklearn",
        "src.apps.vlm.train",
        ["config=src/apps/vlm/configs/debug.yaml"],
        'error: data.datasets.0.kind=digits needs sklearn: pip install -e ".[vision]"',
    ),
}


@pytest.mark.parametrize("extra", CASES)
def test_a_run_without_its_extra_exits_2_before_the_log_dir(tmp_path, extra):
    """`sys.modules[name] = None` makes any import of it fail, as if it were not installed."""
    blocked, module, args, needle = CASES[extra]
    code = f"import sys; sys.modules[{blocked!r}] = None; from {module} import main; main()"
    log_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", code, *args, f"orchestration.log_dir={log_dir}"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_bad_input(out, needle, log_dir)
    assert out.stderr.strip() == needle and "Traceback" not in out.stderr
