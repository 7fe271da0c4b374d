"""The one home folder: every file ragserve writes lives under it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9997


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def models(self) -> Path:
        """The model store that `pull` fills."""
        return self.root / "models"

    @property
    def cache(self) -> Path:
        """Hub library caches (Hugging Face, ModelScope), kept inside the home."""
        return self.root / "cache"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Pid and state files of the running server."""
        return self.root / "run"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.run / "server.pid"

    @property
    def server_info_file(self) -> Path:
        """Where a running server records its address, so CLI commands can find it."""
        return self.run / "server.json"

    @property
    def lock_file(self) -> Path:
        """Locked (flock) by the running server for its whole life: one server per home."""
        return self.run / "server.lock"

    @property
    def models_state_file(self) -> Path:
        """The models that were running, relaunched when the server restarts."""
        return self.run / "models.json"

    def worker_log(self, uid: str) -> Path:
        return self.logs / f"worker-{uid}.log"

    def ensure(self) -> "Home":
        for folder in (self.root, self.models, self.cache, self.logs, self.run):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self

    def lock_down(self) -> list[str]:
        """Home 0700, run/ and logs/ 0700 and their files 0600, also in a home made before this rule.

        run/ holds the workers' specs and the server's address, logs/ the requests' errors: neither is for
        other local users. Returns the paths whose mode could not be changed (owned by someone else).
        """
        failed: list[str] = []
        targets = [(self.root, 0o700), (self.run, 0o700), (self.logs, 0o700)]
        targets += [(path, 0o600) for folder in (self.run, self.logs) for path in folder.iterdir()
                    if path.is_file() and not path.is_symlink()]
        for path, mode in targets:
            try:
                if path.stat().st_mode & 0o777 != mode:
                    path.chmod(mode)
            except OSError:
                failed.append(str(path))
        return failed

    def library_env(self) -> dict[str, str]:
        """Environment that points hub and ML libraries' caches into the home.

        Set for worker processes and hub downloads, so nothing lands in ~/.cache
        on a shared server where the user's home quota is small.
        """
        return {
            "RAGSERVE_HOME": str(self.root),
            "HF_HOME": str(self.cache / "huggingface"),
            "MODELSCOPE_CACHE": str(self.cache / "modelscope"),
            "MODELSCOPE_HOME": str(self.cache / "modelscope-home"),
            "SENTENCE_TRANSFORMERS_HOME": str(self.cache / "sentence_transformers"),
            "TORCH_HOME": str(self.cache / "torch"),
        }


def resolve_home(explicit: str | os.PathLike | None = None) -> Home:
    """--home beats RAGSERVE_HOME beats ~/.ragserve."""
    raw = explicit or os.environ.get("RAGSERVE_HOME") or Path.home() / ".ragserve"
    return Home(Path(raw).expanduser().resolve()).ensure()
