"""The `vllm` command (vLLM's console script `vllm = vllm.entrypoints.cli.main:main`): here only `serve`."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] != "serve":
        print("usage: vllm serve [model_tag] [options]\nvllm: error: the stand-in implements only `serve`",
              file=sys.stderr)
        raise SystemExit(2)
    from vllm.entrypoints.openai.server import serve

    serve(argv[1:])


if __name__ == "__main__":
    main()
