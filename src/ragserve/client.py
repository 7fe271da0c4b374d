"""A small HTTP client for a running ragserve server, used by the CLI commands."""

from __future__ import annotations

import json
import os
from typing import Any

from ragserve.settings import DEFAULT_HOST, DEFAULT_PORT, Home


class ServerError(Exception):
    """The server answered with an error, or could not be reached; the message says which."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def default_endpoint(home: Home) -> str:
    """The running server's address from the home's server file, else the default port."""
    env = os.environ.get("RAGSERVE_ENDPOINT")
    if env:
        return env.rstrip("/")
    try:
        info = json.loads(home.server_info_file.read_text())
        return f"http://{info['client_host']}:{info['port']}"
    except (OSError, ValueError, KeyError):
        return f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


class RagserveClient:
    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 600.0):
        self.endpoint = endpoint.rstrip("/")
        api_key = api_key or (os.environ.get("RAGSERVE_API_KEY") or None)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        import httpx  # here, not at the top: `ragserve serve` imports this module and never needs httpx

        self._http = httpx.Client(base_url=self.endpoint, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RagserveClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ServerError(
                f"no ragserve server answers at {self.endpoint}: start one with `ragserve serve` "
                f"(or pass --endpoint)"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ServerError(f"the server at {self.endpoint} did not answer in time ({exc})") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                text = " ".join(response.text.split())
                message = text if len(text) <= 200 else text[:200] + " ..."
            raise ServerError(f"{response.status_code}: {message}", response.status_code)
        return response.json() if response.content else None

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def list_models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def describe_model(self, uid: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{uid}")

    def launch(self, **payload: Any) -> str:
        payload = {k: v for k, v in payload.items() if v is not None}
        return self._request("POST", "/v1/models", json=payload)["model_uid"]

    def terminate(self, uid: str) -> None:
        self._request("DELETE", f"/v1/models/{uid}")
