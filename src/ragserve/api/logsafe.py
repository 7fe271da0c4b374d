"""Log lines that a client cannot forge.

Request paths arrive percent-decoded (`%0a` is a newline), and error messages may quote what a client sent;
written as they are, they can start a fake line in the log. `LogEscapeFilter` makes every record one line:
control characters in the message are escaped (`\\n`, `\\x1b`, ...), and each line of a traceback after the
first is indented, so only a real record starts a line at column 0.
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators that some viewers break lines at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The gateway's own loggers and uvicorn's; the filter also goes on every handler of the root logger.
_LOGGERS = ("ragserve", "ragserve.access", "ragserve.supervisor", "ragserve.memory", "uvicorn", "uvicorn.error",
            "uvicorn.access")


def _escape_char(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape, so it stays on one line."""
    return _CONTROL.sub(_escape_char, text)


def _indent_continuations(text: str) -> str:
    lines = [escape_controls(line) for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([lines[0]] + [line if line[:1].isspace() else "    " + line for line in lines[1:]])


class LogEscapeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_ragserve_escaped", False):
            return True
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _indent_continuations(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = _indent_continuations(record.stack_info)
        record._ragserve_escaped = True
        return True


_FILTER = LogEscapeFilter()


def install_log_escaping() -> None:
    """Put the filter on the gateway's and uvicorn's loggers and on the root logger's handlers (once each)."""
    targets = [logging.getLogger(name) for name in _LOGGERS] + list(logging.getLogger().handlers)
    for target in targets:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
