"""Feed the `vllm serve` argument lists that ragserve builds to the real vLLM's own parser.

Run by scripts/check-vllm.sh inside a venv with the real vllm package (PYTHONPATH=src). For each
representative spec it takes `ragserve.engines.vllm_command.serve_command(spec)` -- exactly what
the engine runs -- and runs vLLM's own `vllm` CLI entry (vllm.entrypoints.cli.main:main) on it,
with the `serve` subcommand's action replaced by a capture, so vLLM's parser and its
validate step run but nothing is served. A spec fails when:
  - vLLM's parser rejects the list (unknown flag, bad value): argparse exits;
  - a value we send does not land in the parsed namespace (renamed or dropped flag);
  - a parsed value is read by neither vLLM's EngineArgs nor its frontend arguments (ignored), or
    EngineArgs.from_cli_args does not carry it over.
Prints one line per spec and exits 1 on any failure.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from ragserve.control.spec import ModelSpec, ModelType
from ragserve.engines import vllm_command


def _folder(root: Path, name: str, architecture: str, model_type: str, **files: Any) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
    for file_name, content in files.items():
        (folder / file_name.replace("__", ".")).write_text(json.dumps(content))
    return str(folder)


def representative_specs(root: Path) -> list[ModelSpec]:
    template = root / "thinking.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}<think>\n")

    def spec(uid: str, model_type: ModelType, path: str, **kwargs: Any) -> ModelSpec:
        return ModelSpec(uid=uid, model_name=uid, model_type=model_type, model_engine="vllm", model_path=path,
                         **kwargs)

    return [
        spec("qwen3-8b-thinking", ModelType.LLM, _folder(root, "Qwen3-8B", "Qwen3ForCausalLM", "qwen3"), n_ctx=32768,
             options={"gpu_memory_utilization": 0.85, "tensor_parallel_size": 2, "dtype": "bfloat16",
                      "max_num_seqs": 32, "chat_template": str(template), "enforce_eager": True,
                      "trust_remote_code": True, "extra_args": "--reasoning-parser qwen3"}),
        spec("qwen2.5-7b-awq", ModelType.LLM,
             _folder(root, "Qwen2.5-7B-Instruct-AWQ", "Qwen2ForCausalLM", "qwen2"), n_ctx=8192,
             quantization="awq", options={"gpu_memory_utilization": 0.5}),
        spec("qwen3-embedding", ModelType.EMBEDDING,
             _folder(root, "Qwen3-Embedding-4B", "Qwen3ForCausalLM", "qwen3"), n_ctx=8192),
        spec("bge-m3", ModelType.EMBEDDING, _folder(root, "bge-m3", "XLMRobertaModel", "xlm-roberta"),
             options={"max_model_len": 8192, "dtype": "float16"}),
        spec("qwen3-reranker", ModelType.RERANK,
             _folder(root, "Qwen3-Reranker-4B", "Qwen3ForCausalLM", "qwen3"), n_ctx=8192,
             options={"gpu_memory_utilization": 0.3}),
        spec("bge-reranker", ModelType.RERANK,
             _folder(root, "bge-reranker-v2-m3", "XLMRobertaForSequenceClassification", "xlm-roberta"),
             options={"tensor_parallel_size": 1}),
    ]


class _Parsed(Exception):
    pass


def use_cpu_platform() -> None:
    """vLLM builds its parser only on a known platform. VLLM_TARGET_DEVICE=cpu (set by check-vllm.sh)
    says so to recent releases; older ones (0.9) ignore it, so the CPU platform is set directly, as
    vLLM's own `vllm bench` does for itself."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    if platforms._current_platform is None:
        platforms._current_platform = CpuPlatform()


def vllm_parse(argv: list[str]) -> Any:
    """vLLM's own CLI on `vllm <argv>`, stopped right after parsing and validation."""
    import vllm.entrypoints.cli.serve as serve_module
    from vllm.entrypoints.cli.main import main

    def capture(args: Any) -> None:
        raise _Parsed(args)

    serve_module.ServeSubcommand.cmd = staticmethod(capture)
    sys.argv = ["vllm", *argv]
    try:
        main()
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as exc:
        raise AssertionError(f"vLLM's parser rejected the arguments (exit {exc.code}; its message is above)") from exc
    raise AssertionError("vLLM's CLI returned without dispatching `serve`")


def _flag_values(argv: list[str]) -> list[tuple[str, Any]]:
    """(dest, value sent) for each --flag; True for a switch."""
    pairs, index = [], 2  # after "serve", MODEL
    while index < len(argv):
        flag = argv[index]
        assert flag.startswith("--"), f"stray argument {flag!r}"
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        pairs.append((flag[2:].replace("-", "_"), argv[index + 1] if has_value else True))
        index += 2 if has_value else 1
    return pairs


def _same(got: Any, sent: Any) -> bool:
    if sent is True:
        return got is True
    if isinstance(got, (list, tuple)) and len(got) == 1:
        got = got[0]
    if isinstance(got, dict):
        return got == json.loads(sent)
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        return float(got) == float(sent)
    return str(getattr(got, "value", got)) == str(sent)


def _frontend_fields() -> set[str] | None:
    """The server's own options (FrontendArgs); None before vLLM declared them as a dataclass (0.9),
    when make_arg_parser adds them one by one and every parsed non-engine option is one of them."""
    for module in ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.openai.cli_args"):
        try:
            frontend = importlib.import_module(module).FrontendArgs
        except (ImportError, AttributeError):
            continue
        return {f.name for f in dataclasses.fields(frontend)}
    return None


def check(spec: ModelSpec) -> list[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    argv = vllm_command.serve_command(spec, port=8000)
    args = vllm_parse(argv)
    problems = []
    if getattr(args, "model_tag", None) != argv[1]:
        problems.append(f"the model {argv[1]!r} parsed as model_tag={getattr(args, 'model_tag', None)!r}")
    args.model = args.model_tag  # what `vllm serve` does before building the engine arguments
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_fields = {f.name for f in dataclasses.fields(engine_args)}
    frontend_fields = _frontend_fields()
    for dest, sent in _flag_values(argv):
        if not hasattr(args, dest):
            problems.append(f"--{dest}: not in vLLM's parsed arguments")
        elif not _same(getattr(args, dest), sent):
            problems.append(f"--{dest} {sent!r} parsed as {getattr(args, dest)!r}")
        elif dest in engine_fields and not _same(getattr(engine_args, dest), sent):
            problems.append(f"--{dest} {sent!r} became EngineArgs.{dest}={getattr(engine_args, dest)!r}")
        elif dest not in engine_fields and frontend_fields is not None and dest not in frontend_fields:
            problems.append(f"--{dest}: parsed, but read by neither EngineArgs nor the frontend (ignored)")
    print(f"{'ok  ' if not problems else 'FAIL'} {spec.uid}: vllm {' '.join(argv)}", flush=True)
    return problems


def control_is_rejected(root: Path) -> bool:
    """The harness itself: a list with a flag vLLM does not have must be refused, or nothing here is checked."""
    spec = ModelSpec(uid="control", model_name="control", model_type=ModelType.LLM, model_engine="vllm",
                     model_path=_folder(root, "control", "Qwen3ForCausalLM", "qwen3"),
                     options={"extra_args": "--no-such-vllm-flag 1"})
    try:
        vllm_parse(vllm_command.serve_command(spec, port=8000))
    except AssertionError:
        print("ok   control: a flag vLLM does not have is rejected", flush=True)
        return True
    print("FAIL control: vLLM accepted --no-such-vllm-flag, so this harness does not reach its parser", flush=True)
    return False


def main() -> int:
    print(f"vllm {importlib.metadata.version('vllm')}, python {sys.version.split()[0]}", flush=True)
    use_cpu_platform()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        failures += not control_is_rejected(Path(tmp))
        for spec in representative_specs(Path(tmp)):
            try:
                problems = check(spec)
            except AssertionError as exc:
                print(f"FAIL {spec.uid}: {exc}", flush=True)
                problems = [str(exc)]
            for problem in problems:
                print(f"     - {problem}", flush=True)
            failures += bool(problems)
    print("all argument lists accepted and carried by vLLM" if not failures else f"{failures} spec(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
