"""Choosing one quantization out of a GGUF repo, instead of pulling every file in it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ragserve.hub.errors import HubError

# Quantization tags as llama.cpp names them, found between separators in a file name:
# Q4_K_M, Q8_0, IQ4_XS, TQ1_0, F16, BF16, MXFP4_MOE ...
_QUANT_RE = re.compile(
    r"(?:^|[-._])((?:I?Q|TQ)\d+(?:_[A-Za-z0-9]+)*|BF16|F16|FP16|F32|FP32|MXFP4(?:_MOE)?)(?=$|[-.])",
    re.IGNORECASE,
)
# Large models are split as NAME-00001-of-00003.gguf; the parts belong together.
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})$")
# Vision projectors ship next to the LLM weights; they are never "the model".
_AUX_PREFIXES = ("mmproj",)
PREFERRED_QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0")


@dataclass
class GgufChoice:
    quant: str | None
    files: list[str] = field(default_factory=list)
    size: int = 0

    @property
    def label(self) -> str:
        return self.quant or PurePosixPath(self.files[0]).name


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def quant_of(path: str) -> str | None:
    stem = PurePosixPath(path).name[: -len(".gguf")]
    stem = _SPLIT_RE.sub("", stem)
    found = _QUANT_RE.findall(stem)
    return found[-1].upper() if found else None


def split_key(path: str) -> str:
    """The name the parts of a split GGUF share (a file's own name for anything else)."""
    return _SPLIT_RE.sub("", path[: -len(".gguf")]) if is_gguf(path) else path


def gguf_choices(sizes: dict[str, int | None]) -> list[GgufChoice]:
    """Group a repo's .gguf files into choices: one per file, split parts together."""
    groups: dict[str, GgufChoice] = {}
    for path in sorted(sizes):
        name = PurePosixPath(path).name
        if not is_gguf(path) or name.lower().startswith(_AUX_PREFIXES):
            continue
        key = _SPLIT_RE.sub("", path[: -len(".gguf")])
        choice = groups.setdefault(key, GgufChoice(quant=quant_of(path)))
        choice.files.append(path)
        choice.size += sizes[path] or 0
    return list(groups.values())


def describe_choices(choices: list[GgufChoice]) -> str:
    return ", ".join(f"{c.label} ({_gb(c.size)})" for c in choices)


def pick_files(model_id: str, sizes: dict[str, int | None], *, quant: str | None,
               filename: str | None) -> list[str] | None:
    """The files to pull: None means the whole repo (not a GGUF repo and nothing asked for)."""
    if filename:
        return _pick_by_name(model_id, sizes, filename)
    choices = gguf_choices(sizes)
    if not choices:
        if quant:
            raise HubError(f"{model_id} has no .gguf files, so --quant {quant} does not apply; "
                           "drop --quant to pull the whole model, or pick a GGUF repo", kind="no_gguf")
        return None
    if quant:
        wanted = quant.strip().upper()
        matches = [c for c in choices if c.quant == wanted]
        if not matches:
            raise HubError(f"{model_id} has no {wanted} file; available quantizations: "
                           f"{describe_choices(choices)}. Re-run with --quant set to one of them",
                           kind="ambiguous_quant", suggestions=[c.label for c in choices])
        if len(matches) > 1:
            names = ", ".join(p for c in matches for p in c.files[:1])
            raise HubError(f"{model_id} has several {wanted} files ({names}); choose one with --file NAME.gguf",
                           kind="ambiguous_quant", suggestions=[c.files[0] for c in matches])
        return matches[0].files
    if len(choices) == 1:
        return choices[0].files
    hint = next((q for q in PREFERRED_QUANTS if any(c.quant == q for c in choices)), choices[0].label)
    raise HubError(f"{model_id} is a GGUF repo with {len(choices)} quantizations: {describe_choices(choices)}. "
                   f"Choose one with --quant (e.g. --quant {hint}) or --file NAME.gguf",
                   kind="ambiguous_quant", suggestions=[c.label for c in choices])


def _pick_by_name(model_id: str, sizes: dict[str, int | None], filename: str) -> list[str]:
    exact = [p for p in sizes if p == filename]
    if not exact:
        exact = [p for p in sizes if PurePosixPath(p).name == filename]
    if not exact:
        exact = [p for p in sizes if PurePosixPath(p).name.lower() == PurePosixPath(filename).name.lower()]
    if len(exact) != 1:
        available = [p for p in sorted(sizes) if is_gguf(p)] or sorted(sizes)
        shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
        what = "no file" if not exact else "several files"
        raise HubError(f"{model_id} has {what} named {filename!r}; available: {shown}",
                       kind="file_not_found", suggestions=available)
    path = exact[0]
    if is_gguf(path) and _SPLIT_RE.search(path[: -len(".gguf")]):
        key = _SPLIT_RE.sub("", path[: -len(".gguf")])
        return sorted(p for p in sizes if is_gguf(p) and _SPLIT_RE.sub("", p[: -len(".gguf")]) == key)
    return [path]


def _gb(size: int) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e6:.0f} MB"
