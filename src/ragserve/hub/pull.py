"""`pull`: hub ID -> verified local folder (or the exact .gguf file) in the home's model store."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from ragserve.hub.errors import HubError
from ragserve.hub.gguf import is_gguf, pick_files
from ragserve.hub.ids import check_revision, choose_source, parse_hub_id
from ragserve.hub.sources import HubSource, Listing, RemoteFile, make_source
from ragserve.hub.store import (is_inside, model_dir, now, read_manifest, size_problems, unsafe_name_reason,
                                write_manifest)
from ragserve.settings import Home

Log = Callable[[str], None]


def pull_model(model_id: str, home: Home, *, source: str | None = None, revision: str | None = None,
               quant: str | None = None, filename: str | None = None, progress: bool = True,
               verify: bool = False, log: Log | None = None) -> Path:
    """Download `model_id` into the store and return the local folder, or the chosen .gguf file.

    Re-running resumes an interrupted pull (the libraries keep partial files) and skips files
    already verified. Every downloaded file is checked against the size and checksum the hub
    lists (sha256 for LFS files, the git blob hash for small files on Hugging Face); a file that
    fails is deleted and reported, so the next run downloads it again. `verify=True` re-hashes
    files that were verified before. If the hub cannot be reached but an earlier pull of the same
    selection completed, that local copy is returned.
    """
    say = log or (lambda _msg: None)
    hub_id = parse_hub_id(model_id)
    revision = check_revision(revision)
    source_name = choose_source(source, hub_id)
    src = make_source(source_name, home)
    dest = model_dir(home, source_name, hub_id.repo_id, revision)

    try:
        listing = src.listing(hub_id.repo_id, revision)
    except HubError as exc:
        if exc.kind in ("unreachable", "offline"):
            local = _complete_local_copy(hub_id.repo_id, dest, quant=quant, filename=filename)
            if local is not None:
                say(f"[yellow]warning:[/] {exc.message}\nUsing the copy pulled earlier: {local}")
                return local
        raise
    if not listing.files:
        raise HubError(f"{hub_id.repo_id} exists on {src.label} but has no files at this revision",
                       kind="not_found")
    _refuse_unsafe_names(listing, hub_id.repo_id, src, dest)

    chosen = pick_files(hub_id.repo_id, listing.sizes(), quant=quant, filename=filename)
    selected = [listing.files[p] for p in (chosen if chosen is not None else sorted(listing.files))]
    dest.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(dest) or {}
    recorded: dict = dict(manifest.get("files") or {})
    todo = [f for f in selected if verify or not _still_verified(dest, f, recorded.get(f.path))]
    # Files a killed run finished before it died, or a --verify re-check: hash instead of re-fetching.
    todo = [f for f in todo if _problem(dest / f.path, f) is not None]

    total = sum(f.size or 0 for f in selected)
    if todo:
        what = f"{len(selected)} file(s), {human_size(total)}"
        if chosen is not None and any(is_gguf(p) for p in chosen):
            what = f"{', '.join(chosen)} ({human_size(total)})"
        say(f"Pulling [bold]{hub_id.repo_id}[/] from {src.label} ({src.endpoint()}): {what}\n  into {dest}")
        src.download(hub_id.repo_id, listing.commit or revision, todo, dest, progress=progress)
        problems = _verify(dest, todo)
        if problems:
            detail = "; ".join(problems)
            raise HubError(f"checksum mismatch in {hub_id.repo_id}: {detail}. The bad file(s) were deleted; re-run "
                           f"the same `ragserve pull` to download them again (if it keeps failing, the hub or a "
                           f"proxy is corrupting data: try a mirror via {src.endpoint_env})", kind="checksum")
    else:
        say(f"{hub_id.repo_id} is up to date in {dest}")

    for f in selected:
        stat = (dest / f.path).stat()
        recorded[f.path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": f.sha256,
                            "git_oid": f.git_oid}
    previous_selection = manifest.get("selection")
    if chosen is None or previous_selection == "all":
        selection: str | list[str] = "all"
    else:
        selection = sorted(set(previous_selection or []) | set(chosen))
    previous_gguf = list(manifest.get("gguf") or [])
    gguf = previous_gguf + [p for p in (chosen or []) if is_gguf(p) and p not in previous_gguf]
    write_manifest(dest, {
        "model_id": hub_id.repo_id, "source": source_name, "endpoint": src.endpoint(),
        "revision": revision, "commit": listing.commit, "pulled_at": now(), "complete": True,
        "selection": selection,
        "files": recorded, "gguf": gguf,
    })
    return dest / chosen[0] if chosen else dest


def _refuse_unsafe_names(listing: Listing, repo_id: str, src: HubSource, dest: Path) -> None:
    """Every name the hub lists becomes a path under `dest`: one that could land elsewhere (`../`, an
    absolute path, a backslash, NUL) fails the whole pull before anything is written."""
    for name, remote in sorted(listing.files.items()):
        reason = unsafe_name_reason(name) or unsafe_name_reason(remote.path)
        if reason is None and not is_inside(dest, dest / remote.path):
            reason = "it resolves outside the model folder through a symbolic link"
        if reason:
            raise HubError(
                f"the {src.label} listing of {repo_id} is unsafe: it names the file {name!r}, and {reason}, so it "
                f"could be written outside the model folder {dest}. Nothing was downloaded. A genuine hub never "
                f"lists such a name: check the hub or mirror you use ({src.endpoint_env}={src.endpoint()})",
                kind="unsafe_listing")


def _still_verified(dest: Path, remote: RemoteFile, entry: dict | None) -> bool:
    """Verified by an earlier pull, unchanged on disk since, and unchanged on the hub."""
    if not entry:
        return False
    try:
        stat = (dest / remote.path).stat()
    except OSError:
        return False
    return (stat.st_size == entry.get("size") and stat.st_mtime_ns == entry.get("mtime_ns")
            and (remote.size is None or remote.size == stat.st_size)
            and entry.get("sha256") == remote.sha256 and entry.get("git_oid") == remote.git_oid)


def _verify(dest: Path, files: list[RemoteFile]) -> list[str]:
    problems = []
    for remote in files:
        path = dest / remote.path
        problem = _problem(path, remote)
        if problem:
            problems.append(f"{remote.path}: {problem}")
            path.unlink(missing_ok=True)
    return problems


def _problem(path: Path, remote: RemoteFile) -> str | None:
    if not path.is_file():
        return "missing after download"
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} bytes, the hub lists {remote.size}"
    if remote.sha256:
        actual = file_sha256(path)
        if actual != remote.sha256.lower():
            return f"sha256 {actual[:12]}..., the hub lists {remote.sha256[:12]}..."
    elif remote.git_oid:
        actual = git_blob_sha1(path)
        if actual != remote.git_oid.lower():
            return f"git blob hash {actual[:12]}..., the hub lists {remote.git_oid[:12]}..."
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: sha1 over `blob <size>\\0<content>`."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _complete_local_copy(repo_id: str, dest: Path, *, quant: str | None, filename: str | None) -> Path | None:
    manifest = read_manifest(dest)
    if not manifest or not manifest.get("complete"):
        return None
    recorded = {p: e for p, e in (manifest.get("files") or {}).items() if not unsafe_name_reason(p)}
    sizes = {p: e.get("size") for p, e in recorded.items()}
    if not sizes:
        return None
    try:
        chosen = pick_files(repo_id, sizes, quant=quant, filename=filename)
    except HubError:
        return None
    # A file truncated or deleted since the pull is not a copy to fall back on.
    changed = {name for name, _have, _want in size_problems(dest, recorded)}
    if chosen is None:
        return dest if manifest.get("selection") == "all" and not changed else None
    return None if changed & set(chosen) else dest / chosen[0]


def human_size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


__all__ = ["pull_model", "file_sha256", "git_blob_sha1", "human_size", "HubSource", "Listing"]
