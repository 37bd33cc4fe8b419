"""A checkpoint's manifest: every file's size and CRC-32, written last inside the atomic rename, so a
folder that passes it is complete and unaltered (truncation, a flipped byte, a missing file).

Checksumming is split across ranks (file i by rank i % world_size) at save and at load, so no rank
reads the whole checkpoint of a large sharded run. CRC-32 runs at GB/s; it guards against damage, not
against tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from .files import write_synced

MANIFEST = "manifest.json"
CHUNK = 16 << 20


def crc32(file: Path) -> str:
    value = 0
    with open(file, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def checksum_part(folder: str | os.PathLike, part: int = 0, parts: int = 1) -> dict[str, dict[str, Any]]:
    """Size and CRC-32 of this rank's share of the folder's files."""
    folder = Path(folder)
    names = checkpoint_files(folder)[part::parts]
    return {name: {"size": (folder / name).stat().st_size, "crc32": crc32(folder / name)} for name in names}


def write_manifest(folder: str | os.PathLike, entries: dict[str, dict[str, Any]]) -> None:
    write_synced(
        Path(folder) / MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1) + "\n"
    )


def verify_checkpoint(
    path: str | os.PathLike, part: int = 0, parts: int = 1, only: tuple[str, ...] = ()
) -> str | None:
    """What is wrong with a checkpoint folder, or None: every listed file must exist with its size, and
    this rank's share (or just the files in `only`) must match its CRC-32. A folder without a manifest
    predates manifests and is trusted, unless a sibling checkpoint has one (then it lost it)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        siblings = (p / MANIFEST for p in path.parent.iterdir() if p.is_dir() and p.name.isdigit())
        return f"no {MANIFEST} (its siblings have one)" if any(m.is_file() for m in siblings) else None
    try:
        files = json.loads(manifest.read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    names = [n for n in sorted(files) if n in only] if only else sorted(files)[part::parts]
    for name in names:
        if crc32(path / name) != files[name].get("crc32"):
            return f"{name} fails its checksum"
    return None
