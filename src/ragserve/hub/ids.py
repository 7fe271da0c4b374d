"""Hub model IDs (`org/name`, optionally prefixed with the hub) and choosing the hub."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ragserve.hub.errors import HubError

MODELSCOPE = "modelscope"
HUGGINGFACE = "huggingface"
SOURCES = (MODELSCOPE, HUGGINGFACE)

# Env var that picks the default hub for `pull` and for `launch` of a hub ID.
SOURCE_ENV = "RAGSERVE_HUB"

_ALIASES = {
    "modelscope": MODELSCOPE, "ms": MODELSCOPE,
    "huggingface": HUGGINGFACE, "hf": HUGGINGFACE, "hugging-face": HUGGINGFACE,
}
# Both hubs allow letters, digits, '-', '_' and '.' in owner and repo names.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# A name with a weights suffix is a mistyped local file, not a repo.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".json", ".yaml", ".yml")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    source: str | None  # from an `hf:` / `ms:` prefix, else None

    @property
    def org(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]


def normalize_source(value: str) -> str:
    source = _ALIASES.get(value.strip().lower())
    if source is None:
        raise HubError(f"unknown hub source {value!r}; use one of: modelscope (ms), huggingface (hf)",
                       kind="bad_id")
    return source


def parse_hub_id(text: str) -> HubId:
    """`org/name`, `hf:org/name`, `ms:org/name` (also `huggingface://org/name`)."""
    raw = text.strip()
    source = None
    match = re.match(r"^([A-Za-z-]+):(?://)?(.*)$", raw)
    if match and match.group(1).lower() in _ALIASES:
        source, raw = _ALIASES[match.group(1).lower()], match.group(2)
    if not _ID_RE.match(raw) or raw.lower().endswith(_FILE_SUFFIXES):
        raise HubError(f"{text!r} is not a hub model ID; expected ORG/NAME such as Qwen/Qwen3-Embedding-4B "
                       "(or a local folder / .gguf file that exists)", kind="bad_id")
    return HubId(repo_id=raw, source=source)


# Branches, tags (refs/pr/1, v1.0) and commits: git's ref rules, narrowed to what both hubs use.
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(?:/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")


def check_revision(revision: str | None) -> str | None:
    """A revision goes into a URL and into the store's folder name: refuse anything but a plain ref."""
    if revision is None or revision == "":
        return None
    if (not isinstance(revision, str) or len(revision) > 200 or not _REVISION_RE.match(revision)
            or ".." in revision or revision.endswith((".", ".lock"))):
        raise HubError(f"revision {revision!r} is not a branch, tag or commit name (letters, digits, '.', '_', "
                       "'-', '+' and '/' between names; no '..', control characters or backslashes): drop "
                       "--revision for the default branch, or give a real one", kind="bad_id")
    return revision


def looks_like_hub_id(text: str) -> bool:
    """True for `org/name` (optionally `hf:`/`ms:` prefixed) that is not an existing local path."""
    if not text or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        if Path(text).expanduser().exists():
            return False
    except OSError:
        return False
    try:
        parse_hub_id(text)
    except HubError:
        return False
    return True


def library_installed(source: str) -> bool:
    if source == MODELSCOPE:
        return any(importlib.util.find_spec(name) is not None for name in ("modelscope_hub", "modelscope"))
    return importlib.util.find_spec("huggingface_hub") is not None


def choose_source(explicit: str | None = None, hub_id: HubId | None = None) -> str:
    """--source, then an `hf:`/`ms:` prefix, then RAGSERVE_HUB, then ModelScope if its library is
    installed (the hub of the seed guide), else Hugging Face."""
    for candidate in (explicit, hub_id.source if hub_id else None, os.environ.get(SOURCE_ENV)):
        if candidate:
            return normalize_source(candidate)
    if library_installed(MODELSCOPE) or not library_installed(HUGGINGFACE):
        return MODELSCOPE
    return HUGGINGFACE
