"""The test suite's own layout: no test module imports another test module (shared tiny configs and helpers
live in tests/conftest.py, or a plain helper module such as tests/notebook_helpers.py), and every folder
holding test files is a package (an `__init__.py`, so two `test_train.py` in two apps never clash)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(module: str, top: str) -> bool:
    """`tests.<...>.test_*` (or anything inside one)."""
    parts = module.split(".")
    return parts[0] == top and any(part.startswith("test_") for part in parts[1:])


def _imported_modules(tree: ast.AST, package: list[str]) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth, relative ones resolved against `package`;
    `from a import b` yields `a.b` too (b may be a module), and `importlib.import_module("...")` its name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def cross_test_imports(root: Path) -> list[str]:
    """`path:line: module` for every import of a test module (`tests.<...>.test_*`) by a Python file under
    `root` (the tests folder): test modules, conftest.py and helper modules alike."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root.parent)
        package = list(rel.parent.parts)  # the package the file is in: tests, tests.apps.gpt, ...
        lines = {}  # one problem a line: the first test module it names
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path)), package):
            if _is_test_module(module, root.name):
                lines.setdefault(line, module)
        problems += [f"{rel.as_posix()}:{line}: imports {module}" for line, module in sorted(lines.items())]
    return problems


def folders_without_init(root: Path) -> list[str]:
    """Folders under `root` (itself included) that hold test_*.py files but no __init__.py."""
    folders = {path.parent for path in root.rglob("test_*.py") if "__pycache__" not in path.parts}
    return sorted(d.relative_to(root.parent).as_posix() for d in folders if not (d / "__init__.py").is_file())


# ----------------------------------------------------------------------------- the real suite


def test_no_test_module_imports_another_test_module():
    problems = cross_test_imports(TESTS)
    assert not problems, "import shared configs and helpers from tests/conftest.py instead:\n" + "\n".join(
        problems
    )


def test_every_folder_of_test_files_is_a_package():
    missing = folders_without_init(TESTS)
    assert not missing, f"add an empty __init__.py to: {', '.join(missing)}"


# ----------------------------------------------------------------------------- the checks can fail


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "tests"


def test_cross_imports_are_found_in_every_spelling(tmp_path):
    tests = _tree(
        tmp_path,
        {
            "tests/__init__.py": "",
            "tests/conftest.py": "TINY = [1]\n",
            "tests/helpers.py": "from tests.conftest import TINY\n",
            "tests/a/__init__.py": "",
            "tests/a/test_y.py": "Y = 1\n",
            "tests/a/test_ok.py": "from tests.conftest import TINY\nfrom tests.helpers import TINY as T\n"
            "import tests.helpers\nfrom src.nanollama import test_utils\nimport json\n",
            "tests/a/test_from.py": "from tests.a.test_y import Y\n",
            "tests/a/test_import.py": "import tests.a.test_y\n",
            "tests/a/test_submodule.py": "from tests.a import test_y\n",
            "tests/a/test_relative.py": "from .test_y import Y\n",
            "tests/a/test_parent.py": "from ..a.test_y import Y\n",
            "tests/a/test_nested.py": "def f():\n    if True:\n        from tests.a.test_y import Y\n",
            "tests/a/test_dynamic.py": "import importlib\nimportlib.import_module('tests.a.test_y')\n",
            "tests/b/test_z.py": "Z = 1\n",
        },
    )
    assert cross_test_imports(tests) == [
        "tests/a/test_dynamic.py:2: imports tests.a.test_y",
        "tests/a/test_from.py:1: imports tests.a.test_y",
        "tests/a/test_import.py:1: imports tests.a.test_y",
        "tests/a/test_nested.py:3: imports tests.a.test_y",
        "tests/a/test_parent.py:1: imports tests.a.test_y",
        "tests/a/test_relative.py:1: imports tests.a.test_y",
        "tests/a/test_submodule.py:1: imports tests.a.test_y",
    ]
    assert folders_without_init(tests) == ["tests/b"]


def test_a_clean_tree_passes(tmp_path):
    tests = _tree(
        tmp_path,
        {
            "tests/__init__.py": "",
            "tests/conftest.py": "TINY = [1]\n",
            "tests/test_top.py": "from tests.conftest import TINY\n",
            "tests/a/__init__.py": "",
            "tests/a/test_x.py": "from tests.conftest import TINY\n",
            "tests/a/fixtures/data.txt": "not python\n",
        },
    )
    assert cross_test_imports(tests) == [] and folders_without_init(tests) == []
