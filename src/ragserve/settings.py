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
    def models_state_file(self) -> Path:
        """The models that were running, relaunched when the server restarts."""
        return self.run / "models.json"

    def worker_log(self, uid: str) -> Path:
        return self.logs / f"worker-{uid}.log"

    def ensure(self) -> "Home":
        for folder in (self.root, self.models, self.cache, self.logs, self.run):
            folder.mkdir(parents=True, exist_ok=True)
        return self

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
