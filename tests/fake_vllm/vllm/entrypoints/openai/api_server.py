"""The old start path, as an alias stub: it re-exports the server's names and serves nothing.

Current vLLM moved its server code (vllm.entrypoints.launchers); `vllm.entrypoints.openai.api_server`
can then be a module of aliases, so `python -m vllm.entrypoints.openai.api_server ...` imports,
warns and exits without ever binding a port. `vllm serve` is the documented way to start it.
"""

import warnings

from vllm.entrypoints.openai.server import create_app, parse_args, serve

__all__ = ["create_app", "parse_args", "serve"]  # the aliases

warnings.warn("`vllm.entrypoints.openai.api_server` is deprecated; use `vllm serve`", DeprecationWarning,
              stacklevel=1)
