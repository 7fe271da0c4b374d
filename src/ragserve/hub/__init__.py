"""Pulling models from ModelScope or Hugging Face into the home's model store.

Public API (used by `ragserve pull`, `ragserve models` and by `launch` for hub IDs):
`looks_like_hub_id`, `pull_model`, `list_store`, `HubError`.
"""

from ragserve.hub.errors import HubError
from ragserve.hub.ids import HUGGINGFACE, MODELSCOPE, SOURCE_ENV, SOURCES, choose_source, looks_like_hub_id, parse_hub_id
from ragserve.hub.pull import pull_model
from ragserve.hub.store import StoredModel, list_store, model_dir

__all__ = [
    "HubError", "looks_like_hub_id", "parse_hub_id", "choose_source", "pull_model", "list_store", "model_dir",
    "StoredModel", "MODELSCOPE", "HUGGINGFACE", "SOURCES", "SOURCE_ENV",
]
