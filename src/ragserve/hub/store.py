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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ragserve.hub.errors import HubError
from ragserve.hub.gguf import split_key
from ragserve.hub.ids import SOURCES
from ragserve.settings import Home

MANIFEST_NAME = ".ragserve-pull.json"
PARTIAL_SUFFIXES = (".incomplete", ".lock", ".parallel_tmp")
DEFAULT_REVISIONS = {None, "", "main", "master"}


def model_dir(home: Home, source: str, repo_id: str, revision: str | None = None) -> Path:
    org, name = repo_id.split("/", 1)
    if revision not in DEFAULT_REVISIONS:
        name = f"{name}@{revision.replace('/', '--')}"
    folder = home.models / source / org / name
    # IDs and revisions are checked where they are parsed; this keeps the store's own promise regardless.
    if source not in SOURCES or any(unsafe_name_reason(part) or "/" in part for part in (org, name)):
        raise HubError(f"{repo_id!r} (revision {revision!r}) does not name a folder inside {home.models}; "
                       "give ORG/NAME and a plain branch, tag or commit", kind="bad_id")
    return folder


def is_inside(folder: Path, path: Path) -> bool:
    """`path` is `folder` or below it once `..` and symlinks already on disk are resolved."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


# Names a hub lists are written below the model folder as given: only plain relative POSIX paths pass.
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def unsafe_name_reason(name: object) -> str | None:
    """Why a file name from a hub listing (or a manifest) must not be written under a model folder;
    None for a plain relative path such as `onnx/model.onnx`."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character (NUL, newline ...)"
    if "\\" in name:
        return "it holds a backslash, a path separator on Windows"
    if name.startswith("/") or _DRIVE_RE.match(name):
        return "it is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it has a '..', '.' or empty path segment"
    if parts[0] == ".cache" or parts[0].startswith(MANIFEST_NAME):
        return "it would overwrite ragserve's own bookkeeping (.cache/, " + MANIFEST_NAME + ")"
    return None


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


def size_problems(folder: Path, recorded: dict) -> list[tuple[str, int | None, int]]:
    """(name, size on disk or None if gone, size recorded by the pull) for each file that differs.
    Sizes only: cheap enough for every `models` listing and every launch."""
    problems = []
    for name, entry in sorted(recorded.items()):
        want = (entry or {}).get("size")
        if not isinstance(want, int) or unsafe_name_reason(name):
            continue
        try:
            have: int | None = (folder / name).stat().st_size
        except OSError:
            have = None
        if have != want:
            problems.append((name, have, want))
    return problems


def summarize_problems(problems: list[tuple[str, int | None, int]]) -> str:
    """E.g. `1 file truncated (x.gguf: 12 of 98 MB); 1 file missing (config.json)`."""
    groups: dict[str, list[str]] = {"truncated": [], "missing": [], "larger than pulled": []}
    for name, have, want in problems:
        if have is None:
            groups["missing"].append(name)
        else:
            groups["truncated" if have < want else "larger than pulled"].append(f"{name}: {_of(have, want)}")
    parts = []
    for what, items in groups.items():
        if items:
            shown = ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")
            parts.append(f"{len(items)} file{'s' if len(items) > 1 else ''} {what} ({shown})")
    return "; ".join(parts)


def _of(have: int, want: int) -> str:
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if want >= s), ("bytes", 1))
    number = (lambda n: f"{n / scale:.1f}" if scale > 1 and n / scale < 10 else f"{n / scale:.0f}")
    return f"{number(have)} of {number(want)} {unit}"


def pull_command(manifest: dict, file: str | None = None) -> str:
    """The `ragserve pull` that fetches this model (or one file of it) again."""
    parts = ["ragserve pull", str(manifest.get("model_id") or "ORG/NAME")]
    if manifest.get("source"):
        parts.append(f"--source {manifest['source']}")
    if manifest.get("revision"):
        parts.append(f"--revision {manifest['revision']}")
    if file:
        parts.append(f"--file {file}")
    return " ".join(parts)


def repull_commands(manifest: dict, problems: list[tuple[str, int | None, int]]) -> str:
    """A whole-repo pull is re-run as it was; a pull of chosen files (--quant/--file) once per file."""
    if manifest.get("selection") == "all":
        return pull_command(manifest)
    return "; ".join(pull_command(manifest, name) for name in sorted({name for name, _, _ in problems}))


def launch_problem(path: Path) -> str | None:
    """For a path inside a pulled model: why it cannot be launched as pulled (a file truncated or deleted
    since), naming the files and the pull to re-run; None when the sizes match or it was not pulled."""
    folder = next((p for p in (path, *path.parents) if (p / MANIFEST_NAME).is_file()), None)
    manifest = read_manifest(folder) if folder is not None else None
    if not manifest:
        return None
    recorded = manifest.get("files") or {}
    relative = path.relative_to(folder).as_posix() if path != folder else None
    file = None
    if relative is not None and path.is_file():  # one GGUF (with its split parts): only its files matter
        recorded = {n: e for n, e in recorded.items() if split_key(n) == split_key(relative)}
        file = relative
    elif relative is not None:
        recorded = {n: e for n, e in recorded.items() if n.startswith(relative + "/")}
    problems = size_problems(folder, recorded)
    if not problems:
        return None
    return (f"{folder} no longer holds what was pulled: {summarize_problems(problems)}. "
            f"Re-run `{pull_command(manifest, file)}` to download it again")


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
    problem: str | None = None  # files that changed size since the pull, e.g. "1 file truncated (...)"
    repull: str | None = None   # the `ragserve pull` command(s) that fetch them again

    @property
    def status(self) -> str:
        return "complete" if self.complete and not self.problem else "incomplete"

    @property
    def status_detail(self) -> str:
        return f"{self.status}: {self.problem}" if self.problem else self.status

    def to_dict(self) -> dict:
        return {"source": self.source, "model_id": self.model_id, "path": str(self.path), "size": self.size,
                "files": self.files, "status": self.status, "problem": self.problem, "repull": self.repull,
                "revision": self.revision, "gguf": self.gguf, "pulled_at": self.pulled_at,
                "partial_size": self.partial_size}


def describe(folder: Path, source: str, model_id: str) -> StoredModel:
    files = list(visible_files(folder)) if folder.is_dir() else ([folder] if folder.exists() else [])
    manifest = read_manifest(folder) if folder.is_dir() else None
    size = sum(f.stat().st_size for f in files)
    problems = size_problems(folder, (manifest or {}).get("files") or {}) if manifest else []
    return StoredModel(
        source=source, model_id=(manifest or {}).get("model_id") or model_id, path=folder, size=size, files=len(files),
        complete=bool(manifest and manifest.get("complete")) or source == "local",
        revision=(manifest or {}).get("revision"), gguf=list((manifest or {}).get("gguf") or []),
        pulled_at=(manifest or {}).get("pulled_at"),
        partial_size=partial_bytes(folder) if folder.is_dir() else 0,
        problem=summarize_problems(problems) or None,
        repull=repull_commands(manifest, problems) if manifest and problems else None,
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
