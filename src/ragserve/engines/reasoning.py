"""Split a reasoning model's `<think>...</think>` block from its answer, as text streams in.

Qwen3 (and DeepSeek-R1 style models) write their reasoning first, inside think tags, then
the answer. OpenAI-compatible clients such as RAGFlow read the two apart: the reasoning as
`reasoning_content`, the answer as `content`. Every engine yields plain text, and the worker
runs it through one splitter per request:

    splitter = ReasoningSplitter(start_in_reasoning=prompt_opens_reasoning(prompt))
    for delta in engine.generate(request):
        reasoning, content = splitter.feed(delta.text)
        ...  # send whichever is non-empty
    reasoning, content = splitter.flush()  # at the end: what was held back

Rules:
- Only a `<think>` at the very start of the output (leading whitespace allowed) opens
  reasoning; a model that merely mentions the tag later in its answer keeps it as content.
- Some templates open `<think>` in the prompt themselves (the output then holds only the
  closing tag): every engine renders its prompt, and LLMEngine.opens_reasoning decides with
  `prompt_opens_reasoning(prompt)`, so the splitter starts in reasoning. Without that hint, a
  `</think>` met before any `<think>` still ends reasoning, but the text before it has
  already gone out as content.
- Tags split across chunks are handled: the splitter holds back a possible tag prefix
  (at most len("</think>") - 1 characters) until the next chunk decides it.
- Whitespace around the reasoning and at the start of the answer is dropped, as Qwen3
  writes `<think>\\n...\\n</think>\\n\\n`; whitespace inside either part is kept.
- With thinking off, Qwen3's template ends the prompt with an empty think block and the
  output has no tags: everything is content, reasoning stays empty.

A splitter is for one response; it is not thread-safe.
"""

from __future__ import annotations

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt leaves a `<think>` open, so the output starts inside reasoning."""
    return prompt.rfind(OPEN_TAG) > prompt.rfind(CLOSE_TAG)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """Feed text deltas; get (reasoning_delta, content_delta) pairs. See the module docstring."""

    def __init__(self, *, start_in_reasoning: bool = False) -> None:
        self._state = _REASONING if start_in_reasoning else _START
        self._buffer = ""  # text not yet decided (possible tag prefix, leading whitespace)
        self._reasoning_started = False  # a non-space reasoning character has gone out
        self._pending_space = ""  # whitespace inside reasoning, sent only if more text follows
        self._content_started = False
        self.saw_reasoning = start_in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = [], []
        while True:
            progressed = self._step(reasoning, content, final=False)
            if not progressed:
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of output: release what was held back (an unfinished tag prefix is plain text)."""
        reasoning, content = [], []
        while self._buffer:
            if not self._step(reasoning, content, final=True):
                break
        self._pending_space = ""  # trailing whitespace of the reasoning is dropped
        return "".join(reasoning), "".join(content)

    # One state transition or emission; returns False when it needs more text.
    def _step(self, reasoning: list[str], content: list[str], *, final: bool) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if self._state == _START:
            stripped = buf.lstrip()
            if stripped.startswith(OPEN_TAG):
                self._buffer = stripped[len(OPEN_TAG):]
                self._state = _REASONING
                self.saw_reasoning = True
                return True
            if not final and (not stripped or OPEN_TAG.startswith(stripped)):
                return False  # only whitespace or a prefix of <think> so far
            self._state = _CONTENT
            return True
        if self._state == _REASONING:
            end = buf.find(CLOSE_TAG)
            if end >= 0:
                self._emit_reasoning(buf[:end], reasoning)
                self._pending_space = ""
                self._buffer = buf[end + len(CLOSE_TAG):]
                self._state = _CONTENT
                self.saw_reasoning = True
                return True
            keep = 0 if final else _partial_suffix(buf, CLOSE_TAG)
            self._emit_reasoning(buf[:len(buf) - keep], reasoning)
            self._buffer = buf[len(buf) - keep:]
            return False
        # _CONTENT: a late </think> (prompt opened the block, no hint given) ends reasoning once.
        if not self.saw_reasoning:
            end = buf.find(CLOSE_TAG)
            if end >= 0:
                self._emit_content(buf[:end], content)
                self._buffer = buf[end + len(CLOSE_TAG):]
                self._content_started = False
                self.saw_reasoning = True
                return True
            keep = 0 if final else _partial_suffix(buf, CLOSE_TAG)
        else:
            keep = 0
        self._emit_content(buf[:len(buf) - keep], content)
        self._buffer = buf[len(buf) - keep:]
        return False

    def _emit_reasoning(self, text: str, out: list[str]) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_started = True
        body = text.rstrip()
        if body:
            out.append(self._pending_space + body)
            self._pending_space = text[len(body):]
        else:
            self._pending_space += text

    def _emit_content(self, text: str, out: list[str]) -> None:
        if not self._content_started:
            text = text.lstrip()
            if not text:
                return
            self._content_started = True
        out.append(text)

