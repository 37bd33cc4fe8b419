"""`eager`: compile's graph break without importing torch._dynamo at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from src.nanollama.model.eager import eager
from tests.conftest import ROOT, child_env


def test_an_eager_function_runs_eagerly_inside_a_compiled_one():
    calls = []

    @eager
    def record(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))  # a Python side effect: traced once if compiled, every call if eager
        return x * 2

    compiled = torch.compile(lambda x: record(x + 1) - 1)
    for _ in range(3):
        assert torch.equal(compiled(torch.ones(4)), torch.full((4,), 3.0))
    assert calls == [4, 4, 4]
    assert record(torch.ones(2)).tolist() == [2.0, 2.0] and calls[-1] == 2  # and a plain call outside


@pytest.mark.parametrize("app", ["gssm", "gpt", "bert", "multiplication", "dvae", "vlm"])
def test_starting_an_app_does_not_import_dynamo(app):
    """torch._dynamo costs a second or two of every start; only compiling should pay it."""
    code = f"import sys, src.apps.{app}.train; print('torch._dynamo' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]
