"""The two hubs, behind one small interface, each driven through its own library.

The libraries do the transfers (their HTTP clients, auth, retries, endpoint and cache settings,
progress bars); this module lists files, downloads a chosen subset into a plain folder, keeps
partial files across runs where the library would not, and turns the libraries' exceptions into
`HubError`s that name the cause and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ragserve.hub.errors import HubError
from ragserve.hub.ids import HUGGINGFACE, MODELSCOPE
from ragserve.settings import Home

DOWNLOAD_WORKERS = 4
# Where Hugging Face downloads keep their partial files between runs (hidden, inside the model folder).
PARTIAL_DIR = Path(".cache") / "ragserve"


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None = None   # LFS files: the hub's sha256 of the content
    git_oid: str | None = None  # plain git files (Hugging Face): sha1 of the git blob


@dataclass
class Listing:
    files: dict[str, RemoteFile]
    commit: str | None  # resolved commit when the hub reports one

    def sizes(self) -> dict[str, int | None]:
        return {path: f.size for path, f in self.files.items()}


class HubSource:
    name: str
    endpoint_env: str

    def endpoint(self) -> str: ...
    def listing(self, repo_id: str, revision: str | None) -> Listing: ...
    def download(self, repo_id: str, revision: str | None, files: list[RemoteFile], dest: Path,
                 *, progress: bool) -> None: ...
    def search(self, query: str) -> list[str]: ...

    # --- shared error helpers -------------------------------------------------------------
    def unreachable(self, exc: BaseException) -> HubError:
        return HubError(
            f"cannot reach the {self.label} hub at {self.endpoint()} ({_reason(exc)}). Check the network or proxy "
            f"(HTTPS_PROXY), or point {self.endpoint_env} at a reachable mirror of the hub; "
            f"or pull from the other hub with --source {self.other}",
            kind="unreachable")

    def not_found(self, repo_id: str) -> HubError:
        close = self.close_names(repo_id)
        hint = f" Close names on {self.label}: {', '.join(close)}." if close else ""
        return HubError(
            f"model {repo_id!r} was not found on the {self.label} hub ({self.endpoint()}).{hint} Check the ID "
            f"(IDs can differ between hubs; try --source {self.other}), or set a token if the repo is private",
            kind="not_found", suggestions=close)

    def close_names(self, repo_id: str) -> list[str]:
        """Names the hub's own search offers for a wrong ID, closest first (empty if search fails)."""
        name = repo_id.split("/", 1)[-1]
        queries = [name]
        first_token = re.split(r"[-_.]", name)[0]
        if first_token and first_token != name:
            queries.append(first_token)
        for query in queries:
            try:
                found = [f for f in self.search(query) if f.lower() != repo_id.lower()]
            except Exception:  # search is a courtesy: never hide the real error behind it
                return []
            if found:
                ranked = difflib.get_close_matches(repo_id, found, n=5, cutoff=0.3)
                by_name = difflib.get_close_matches(name, [f.split("/", 1)[-1] for f in found], n=5, cutoff=0.3)
                ranked += [f for f in found if f.split("/", 1)[-1] in by_name and f not in ranked]
                return (ranked or found)[:5]
        return []

    @property
    def label(self) -> str:
        return "ModelScope" if self.name == MODELSCOPE else "Hugging Face"

    @property
    def other(self) -> str:
        return HUGGINGFACE if self.name == MODELSCOPE else MODELSCOPE


# ------------------------------------------------------------------------------------------
# Hugging Face (huggingface_hub)
# ------------------------------------------------------------------------------------------
class HuggingFaceSource(HubSource):
    name = HUGGINGFACE
    endpoint_env = "HF_ENDPOINT"

    def __init__(self, home: Home):
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as exc:
            raise HubError("pulling from Hugging Face needs the huggingface_hub library: "
                           "pip install 'ragserve[hub]'", kind="missing_library") from exc
        # Read at call time and passed explicitly: the library reads HF_ENDPOINT once, at import.
        self._endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
        self.cache_dir = home.cache / "huggingface" / "hub"

    def endpoint(self) -> str:
        from huggingface_hub import constants

        return self._endpoint or constants.ENDPOINT

    def _check_online(self) -> None:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise HubError("Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
                           "unset it to pull, e.g. `HF_HUB_OFFLINE=0 ragserve pull ...`", kind="offline")

    def listing(self, repo_id: str, revision: str | None) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        self._check_online()
        try:
            info = HfApi(endpoint=self._endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        except GatedRepoError as exc:
            raise HubError(f"{repo_id} is gated on Hugging Face: accept its terms on the model page, then set "
                           "HF_TOKEN to a token of that account", kind="not_found") from exc
        except RepositoryNotFoundError as exc:
            raise self.not_found(repo_id) from exc
        except RevisionNotFoundError as exc:
            raise HubError(f"revision {revision!r} does not exist in {repo_id} on Hugging Face; drop --revision "
                           "for the default branch, or give a branch, tag or commit that exists",
                           kind="revision_not_found") from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise self.unreachable(exc) from exc
            raise
        files = {}
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            files[sibling.rfilename] = RemoteFile(
                path=sibling.rfilename,
                size=sibling.size if sibling.size is not None else (lfs.size if lfs else None),
                sha256=lfs.sha256 if lfs else None,
                git_oid=None if lfs else sibling.blob_id,
            )
        return Listing(files=files, commit=info.sha)

    def download(self, repo_id: str, revision: str | None, files: list[RemoteFile], dest: Path,
                 *, progress: bool) -> None:
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        self._check_online()
        was_disabled = are_progress_bars_disabled()
        if not progress:
            disable_progress_bars()
        try:
            for remote in files:
                self._download_one(repo_id, revision, remote, dest)
        except RepositoryNotFoundError as exc:
            raise self.not_found(repo_id) from exc
        except RemoteEntryNotFoundError as exc:
            raise HubError(f"a file listed by {repo_id} is missing on the hub ({_short(exc)}); re-run the pull "
                           "later", kind="download_failed") from exc
        except LocalEntryNotFoundError as exc:
            # The library's word for "could not get a file's metadata from the hub, and no cached copy".
            raise self.unreachable(exc) from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise self.unreachable(exc) from exc
            raise HubError(f"downloading {repo_id} failed ({_short(exc)}); completed files and partial downloads "
                           "are kept, re-run the same `ragserve pull` to resume", kind="download_failed") from exc
        finally:
            if progress and was_disabled:
                disable_progress_bars()
            elif not progress and not was_disabled:
                enable_progress_bars()

    def _download_one(self, repo_id: str, revision: str | None, remote: RemoteFile, dest: Path) -> None:
        """One file through the library's metadata call and HTTP download, into a partial file that
        survives the process: huggingface_hub >= 1.x deletes its own partial file when a download
        dies, so a killed pull of a 28 GB model would start over. Xet-stored files are left to
        the library, whose chunk cache already makes a re-run skip what was fetched."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        try:
            from huggingface_hub.file_download import http_get
            from huggingface_hub.utils._runtime import is_xet_available
        except ImportError:  # a library layout we do not know: let it download on its own
            http_get = None

        url = hf_hub_url(repo_id, remote.path, revision=revision, endpoint=self._endpoint)
        meta = get_hf_file_metadata(url, endpoint=self._endpoint, retry_on_errors=True)
        if http_get is None or (getattr(meta, "xet_file_data", None) is not None and is_xet_available()):
            hf_hub_download(repo_id, remote.path, revision=revision, local_dir=dest, cache_dir=self.cache_dir,
                            endpoint=self._endpoint)
            return
        from filelock import FileLock  # a dependency of huggingface_hub

        target = dest / remote.path
        partial = dest / PARTIAL_DIR / (remote.path + ".incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        # Two pulls of one model (the CLI and a `launch`) must not append to one partial file.
        with FileLock(str(partial) + ".lock"):
            have = partial.stat().st_size if partial.exists() else 0
            expected = meta.size if meta.size is not None else remote.size
            if expected is not None and have > expected:
                partial.unlink()
                have = 0
            with partial.open("ab") as fh:
                http_get(meta.location, fh, resume_size=have, headers=build_hf_headers(), expected_size=expected,
                         displayed_filename=remote.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)

    def search(self, query: str) -> list[str]:
        from huggingface_hub import HfApi

        return [m.id for m in HfApi(endpoint=self._endpoint).list_models(search=query, limit=20)]


# ------------------------------------------------------------------------------------------
# ModelScope (modelscope_hub, the hub SDK that `modelscope` >= 1.38 delegates to)
# ------------------------------------------------------------------------------------------
class ModelScopeSource(HubSource):
    name = MODELSCOPE
    endpoint_env = "MODELSCOPE_ENDPOINT"

    def __init__(self, home: Home):
        try:
            from modelscope_hub import HubApi, HubConfig
        except ImportError as exc:
            raise HubError("pulling from ModelScope needs the ModelScope hub library: pip install 'ragserve[hub]' "
                           "(or `pip install modelscope`); or use --source huggingface",
                           kind="missing_library") from exc
        # A fresh config reads MODELSCOPE_ENDPOINT / MODELSCOPE_DOMAIN now, not at import. Its config
        # folder (an install id, saved logins) defaults to ~/.modelscope: keep it in the home unless the
        # user points MODELSCOPE_HOME at a login; tokens also come from MODELSCOPE_API_TOKEN.
        self.cache_dir = home.cache / "modelscope"
        config_dir = Path(os.environ.get("MODELSCOPE_HOME") or home.cache / "modelscope-home")
        self.config = HubConfig(cache_dir=self.cache_dir, config_dir=config_dir)
        self._explicit_endpoint = bool(os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN"))
        self.api = HubApi(config=self.config)
        self._resolved = False

    def endpoint(self) -> str:
        return self.config.endpoint

    def _resolve(self, repo_id: str) -> None:
        """With no endpoint set, the library probes its two public sites for the repo; keep its answer."""
        if self._resolved or self._explicit_endpoint:
            return
        from modelscope_hub import HubApi

        endpoint = self.api.resolve_endpoint_for_read(repo_id, repo_type="model")
        self.api = HubApi(config=self.config, endpoint=endpoint)
        self._resolved = True

    def _probe(self) -> None:
        """Fail in a second, not after the library's retry rounds, when the endpoint cannot be reached."""
        import requests

        try:
            requests.head(self.endpoint(), timeout=10, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self.unreachable(exc) from exc

    def listing(self, repo_id: str, revision: str | None) -> Listing:
        from modelscope_hub import NotExistError

        if self._explicit_endpoint:
            self._probe()
        try:
            self._resolve(repo_id)
            entries = self.api.list_repo_files(repo_id, "model", revision=revision or None, recursive=True)
        except NotExistError as exc:
            if revision and self._repo_exists(repo_id):
                raise HubError(f"revision {revision!r} does not exist in {repo_id} on ModelScope; drop --revision "
                               "for the default branch (master), or give a branch or tag that exists",
                               kind="revision_not_found") from exc
            raise self.not_found(repo_id) from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise self.unreachable(exc) from exc
            raise
        files = {
            f.path: RemoteFile(path=f.path, size=f.size, sha256=(f.sha256 or None))
            for f in entries if f.type != "tree" and f.path
        }
        return Listing(files=files, commit=None)

    def _repo_exists(self, repo_id: str) -> bool:
        try:
            return bool(self.api.repo_exists(repo_id, "model"))
        except Exception:
            return False

    def download(self, repo_id: str, revision: str | None, files: list[RemoteFile], dest: Path,
                 *, progress: bool) -> None:
        from modelscope_hub import FileDownloadError, FileIntegrityError, NotExistError

        file_list = [{"Path": f.path, "Size": f.size, "Sha256": f.sha256, "Type": "blob"} for f in files]
        try:
            self._resolve(repo_id)
            with _tqdm_disabled(not progress):
                self.api.download_repo(repo_id, "model", revision=revision or None, cache_dir=self.cache_dir,
                                       local_dir=dest, file_list=file_list, max_workers=DOWNLOAD_WORKERS)
        except FileDownloadError as exc:
            failed = getattr(exc, "failed_files", {}) or {}
            for path, cause in failed.items():
                if isinstance(cause, FileIntegrityError):
                    raise HubError(f"checksum mismatch for {path} from {repo_id}: the hub kept sending bytes that "
                                   f"do not match its sha256 ({_short(cause)}); the bad copy was discarded. Re-run "
                                   "the same `ragserve pull` to download it again, or try a mirror via "
                                   f"{self.endpoint_env}", kind="checksum") from exc
            for cause in failed.values():
                if _is_connection_error(cause):
                    raise self.unreachable(cause) from exc
            names = ", ".join(list(failed)[:5])
            raise HubError(f"{len(failed)} file(s) of {repo_id} failed to download ({names}: "
                           f"{_short(next(iter(failed.values()), exc))}); completed files are kept, re-run the same "
                           "`ragserve pull` to resume", kind="download_failed") from exc
        except NotExistError as exc:
            raise self.not_found(repo_id) from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise self.unreachable(exc) from exc
            raise HubError(f"downloading {repo_id} failed ({_short(exc)}); completed files and partial downloads "
                           "are kept, re-run the same `ragserve pull` to resume", kind="download_failed") from exc

    def search(self, query: str) -> list[str]:
        page = self.api.list_repos("model", search=query, page_size=20)
        return [item.repo_id for item in page.items if getattr(item, "repo_id", None)]


def make_source(name: str, home: Home) -> HubSource:
    return ModelScopeSource(home) if name == MODELSCOPE else HuggingFaceSource(home)


# ------------------------------------------------------------------------------------------
_CONNECTION_ERROR_NAMES = {
    "ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "ProxyError", "TimeoutException",
    "RequestTimeoutError", "NewConnectionError", "NameResolutionError",
}


def _is_connection_error(exc: BaseException | None) -> bool:
    """Both libraries wrap transport errors differently (and across versions); look down the chain."""
    seen = 0
    while exc is not None and seen < 8:
        if any(cls.__name__ in _CONNECTION_ERROR_NAMES for cls in type(exc).__mro__):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _reason(exc: BaseException) -> str:
    """The root cause of a transport error, e.g. "[Errno 111] Connection refused", not three wrappers' text."""
    chain, seen = [], 0
    while exc is not None and seen < 8:
        chain.append(exc)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    for error in reversed(chain):
        match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(error))
        if match:
            return match.group(0).strip()
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    return _short(chain[-1]) if chain else "unknown error"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


@contextlib.contextmanager
def _tqdm_disabled(disabled: bool):
    """ModelScope draws its bars with plain tqdm, which honours TQDM_DISABLE per bar."""
    if not disabled:
        yield
        return
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
