"""The model store inside the home: where pulled models live and how `ragserve models` lists them.

Layout::

    <home>/models/<source>/<org>/<name>[@<revision>]/   the repo's files, as plain files
        .ragserve-pull.json                            what was pulled and verified (written last)
        .cache/huggingface/                            Hugging Face's resume metadata (hidden)
    <home>/cache/huggingface/, <home>/cache/modelscope/   the libraries' own caches and locks

A folder without a manifest is a pull that has not finished (re-run `pull` to resume it).
Anything else put under <home>/models by hand is listed as source "local".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ragserve.hub.ids import SOURCES
from ragserve.settings import Home

MANIFEST_NAME = ".ragserve-pull.json"
PARTIAL_SUFFIXES = (".incomplete", ".lock", ".parallel_tmp")
DEFAULT_REVISIONS = {None, "", "main", "master"}


def model_dir(home: Home, source: str, repo_id: str, revision: str | None = None) -> Path:
    org, name = repo_id.split("/", 1)
    if revision not in DEFAULT_REVISIONS:
        name = f"{name}@{revision.replace('/', '--')}"
    return home.models / source / org / name


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(folder: Path, data: dict) -> None:
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_NAME)


def visible_files(folder: Path):
    """Model files in a folder: not the libraries' hidden folders, our manifest, or partial downloads."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(MANIFEST_NAME) or name.endswith(PARTIAL_SUFFIXES):
                continue
            yield Path(root) / name


def partial_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".incomplete"):
                try:
                    total += (Path(root) / name).stat().st_size
                except OSError:
                    pass
    return total


@dataclass
class StoredModel:
    source: str
    model_id: str
    path: Path
    size: int
    files: int
    complete: bool
    revision: str | None = None
    gguf: list[str] = field(default_factory=list)
    pulled_at: float | None = None
    partial_size: int = 0

    @property
    def status(self) -> str:
        return "complete" if self.complete else "incomplete"

    def to_dict(self) -> dict:
        return {"source": self.source, "model_id": self.model_id, "path": str(self.path), "size": self.size,
                "files": self.files, "status": self.status, "revision": self.revision, "gguf": self.gguf,
                "pulled_at": self.pulled_at, "partial_size": self.partial_size}


def describe(folder: Path, source: str, model_id: str) -> StoredModel:
    files = list(visible_files(folder)) if folder.is_dir() else ([folder] if folder.exists() else [])
    manifest = read_manifest(folder) if folder.is_dir() else None
    size = sum(f.stat().st_size for f in files)
    return StoredModel(
        source=source, model_id=(manifest or {}).get("model_id") or model_id, path=folder, size=size, files=len(files),
        complete=bool(manifest and manifest.get("complete")) or source == "local",
        revision=(manifest or {}).get("revision"), gguf=list((manifest or {}).get("gguf") or []),
        pulled_at=(manifest or {}).get("pulled_at"),
        partial_size=partial_bytes(folder) if folder.is_dir() else 0,
    )


def list_store(home: Home) -> list[StoredModel]:
    models: list[StoredModel] = []
    root = home.models
    if not root.is_dir():
        return models
    for top in sorted(root.iterdir()):
        if top.name.startswith("."):
            continue
        if top.is_dir() and top.name in SOURCES:
            for org in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for repo in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    models.append(describe(repo, top.name, f"{org.name}/{repo.name}"))
        else:
            models.append(describe(top, "local", top.name))
    return models


def now() -> float:
    return round(time.time(), 3)
