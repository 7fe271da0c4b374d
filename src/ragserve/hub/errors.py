"""The one error the hub layer raises: its message names the cause and the fix."""

from __future__ import annotations


class HubError(Exception):
    """A pull failed for a reason the user can act on.

    `kind` lets callers (the `launch` path, tests) branch without parsing the message:
    not_found, revision_not_found, file_not_found, unreachable, offline, checksum,
    ambiguous_quant, no_gguf, missing_library, bad_id, download_failed, unsafe_listing.
    """

    def __init__(self, message: str, *, kind: str = "error", suggestions: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.suggestions = list(suggestions or [])

    def __str__(self) -> str:
        return self.message
