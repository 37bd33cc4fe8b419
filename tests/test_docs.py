"""The docs cannot go stale: the front page's file tree, the app READMEs, the config-key tables and every
relative link are checked against the code. Fast: nothing is trained, only files are read."""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CORE = ROOT / "src" / "nanollama"
APPS = ROOT / "src" / "apps"
CONFIG_PAGE = ROOT / "docs" / "configuration.md"  # where every core config key has its row

# The core config dataclasses and the section each sits under in a run config. Each entry lists the
# modules to try in order, so a class that moves only needs its new home added here.
CONFIG_CLASSES = [
    (
        "orchestration",
        "OrchestrationConfig",
        ["src.nanollama.monitor.orchestration", "src.nanollama.monitor.monitor"],
    ),
    ("cluster", "ClusterConfig", ["src.nanollama.distributed", "src.nanollama.app"]),
    ("optim", "OptimConfig", ["src.nanollama.optim"]),
    ("init", "InitConfig", ["src.nanollama.init_checkpoint", "src.nanollama.init"]),
    ("model", "TransformerConfig", ["src.nanollama.model.transformer"]),
    ("data", "TextDataConfig", ["src.nanollama.data.packing"]),
    ("tokenizer", "TokenizerConfig", ["src.nanollama.data.text"]),
    ("vision", "VisionConfig", ["src.nanollama.model.vision"]),
]

# Links to pages that are announced but not written yet; remove an entry once its file exists.
PENDING_LINKS: set[str] = set()


def doc_pages() -> list[Path]:
    pages = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted(APPS.glob("*/README.md"))]
    pages += [p for p in (ROOT / "benchmarks" / "README.md", ROOT / "tests" / "README.md") if p.is_file()]
    return pages


def app_names() -> list[str]:
    return sorted(p.parent.name for p in APPS.glob("*/train.py"))


# ----------------------------------------------------------------------------- markdown parsing


FENCE = re.compile(r"^(```|~~~)")


def strip_code(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings live."""
    out, in_fence, in_indented, previous = [], False, False, ""
    for line in text.split("\n"):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        # an indented code block: 4 spaces after a blank line (or more of the block), not a list item
        in_indented = (
            line.startswith("    ")
            and (in_indented or not previous.strip())
            and not re.match(r"\s*([-*+]|\d+\.)\s", line)
        )
        previous = line
        if in_fence or in_indented:
            continue
        out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def section(text: str, heading_words: tuple[str, ...]) -> list[str]:
    """Lines from the first heading that contains one of `heading_words` to the next heading of the same
    or a higher level."""
    lines, start, level = text.split("\n"), None, 0
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*)", line)
        if not m:
            continue
        if start is None and any(w in m.group(2).lower() for w in heading_words):
            start, level = i, len(m.group(1))
        elif start is not None and len(m.group(1)) <= level:
            return lines[start:i]
    assert start is not None, f"README.md has no heading with any of {heading_words}"
    return lines[start:]


def tree_paths(readme: str) -> set[str]:
    """The paths of the front page's file tree: the first fenced block of its Files/Layout/tree section,
    one entry a line, nesting read from the column where the name starts (4 characters a level)."""
    lines = section(readme, ("files", "layout", "tree"))
    start = next(i for i, line in enumerate(lines) if FENCE.match(line.strip()))
    end = next(i for i in range(start + 1, len(lines)) if FENCE.match(lines[i].strip()))
    paths, stack = set(), []
    for line in lines[start + 1 : end]:
        m = re.match(r"^([\s│├└─]*)(\S+)", line)
        if not m or m.group(2) == ".":
            continue
        depth = len(m.group(1)) // 4
        name = m.group(2)
        stack = stack[: max(depth - 1, 0)]
        path = "".join(stack) + name
        paths.add(path)
        stack.append(name if name.endswith("/") else name + "/")
    return paths


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in path.read_text().split("\n"):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(strip_code(page.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


# ----------------------------------------------------------------------------- 1. the front page's tree


def test_every_core_module_and_folder_is_in_the_front_page_tree():
    paths = tree_paths(README.read_text())
    wanted = [p for p in CORE.rglob("*.py") if p.name != "__init__.py" and "__pycache__" not in p.parts]
    wanted += [p for p in CORE.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    missing = []
    for p in wanted:
        rel = p.relative_to(ROOT).as_posix() + ("/" if p.is_dir() else "")
        if rel not in paths:
            missing.append(rel)
    assert not missing, f"README.md's file tree has no line for: {', '.join(sorted(missing))}"


def test_every_app_has_a_row_in_the_front_page_files_section():
    files = "\n".join(section(README.read_text(), ("files", "layout", "tree")))
    missing = [a for a in app_names() if f"](src/apps/{a}/README.md)" not in files]
    assert not missing, f"README.md's Files section has no row linking the README of: {', '.join(missing)}"


def test_tree_parsing_reads_nesting():
    tree = [".", "├── src/", "│   ├── nanollama/      core", "│   │   ├── a.py  x", "│   │   └── m/"]
    tree += ["│   │       └── b.py", "└── docs/"]
    readme = "## Files\n\n```\n" + "\n".join(tree) + "\n```\n"
    assert tree_paths(readme) == {
        "src/",
        "src/nanollama/",
        "src/nanollama/a.py",
        "src/nanollama/m/",
        "src/nanollama/m/b.py",
        "docs/",
    }


# ----------------------------------------------------------------------------- 2. app READMEs


@pytest.mark.parametrize("app", app_names())
def test_every_app_has_a_readme_that_the_front_page_links(app):
    assert (APPS / app / "README.md").is_file(), f"src/apps/{app}/ has a train.py but no README.md"
    link = f"src/apps/{app}/README.md"
    assert link in relative_links(README), f"README.md does not link {link}"


# ----------------------------------------------------------------------------- 3. config keys


def load_class(name: str, modules: list[str]) -> type:
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise AssertionError(f"{name} is in none of {modules}: add its new module to CONFIG_CLASSES")


def dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every leaf key of a config dataclass, nested dataclasses recursed into."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, f.type)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            keys += dotted_keys(kind, f"{prefix}.{f.name}")
        else:
            keys.append(f"{prefix}.{f.name}")
    return keys


def documented_keys(page: Path) -> set[str]:
    """Code spans of a page: `optim.lr`, and `optim.lr=...` counts for `optim.lr` too."""
    spans = re.findall(r"`([^`\n]+)`", page.read_text())
    return {s.split("=", 1)[0].strip() for s in spans}


@pytest.mark.parametrize("section_name,cls_name,modules", CONFIG_CLASSES, ids=[c[0] for c in CONFIG_CLASSES])
def test_every_core_config_key_has_a_row_in_docs_configuration(section_name, cls_name, modules):
    cls = load_class(cls_name, modules)
    keys = dotted_keys(cls, section_name)
    assert keys, f"{cls_name} has no fields"
    documented = documented_keys(CONFIG_PAGE)
    missing = [k for k in keys if k not in documented]
    assert not missing, (
        f"docs/configuration.md does not document ({cls_name}): {', '.join(missing)}; "
        "add a table row with the key in backticks and its meaning"
    )


def test_nested_config_sections_are_recursed_into():
    keys = dotted_keys(load_class(*CONFIG_CLASSES[0][1:]), "orchestration")
    assert "orchestration.checkpoint.keep_only" in keys and "orchestration.eval_job.slurm.time" in keys
    assert "orchestration.checkpoint" not in keys


# ----------------------------------------------------------------------------- 4. links


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if rel not in PENDING_LINKS:
                broken.append(f"{target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_link_check_sees_links_and_headings():
    assert github_slug("Hugging Face export/import") == "hugging-face-exportimport"
    assert github_slug("`orchestration` keys (a, b)") == "orchestration-keys-a-b"
    assert strip_code("see `[x](y)` and [a](b.md)\n```\n[c](d)\n```") == "see  and [a](b.md)"
    assert {p.name for p in doc_pages()} >= {"README.md", "configuration.md"}
