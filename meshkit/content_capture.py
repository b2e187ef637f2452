"""Prompts and answers stay out of telemetry unless an operator opts in (``capture_content``).

Off (the default), nothing a service logs, traces or counts carries a
request's text: messages name fields and limits, never values; a logged
traceback keeps its frames and exception types but drops every exception's
message (``content_free_traceback``), since a library's message may quote its
input (a template error naming a missing key, say); exported spans lose
exception messages the same way (``meshkit.tracing.content_free``).

On (``NLPMESH_<SERVICE>_CAPTURE_CONTENT=true``, for debugging), tracebacks and
span exceptions are kept whole, and the gateway's request span carries the
prompt and the answer (``gen_ai.prompt``, ``gen_ai.completion``). A service
with it on says so in a WARNING when it starts.
"""
from __future__ import annotations

import logging
import traceback

log = logging.getLogger("nlpmesh.content")

# As the traceback module words them.
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

CAPTURE_WARNING = (
    "%s: capture_content is on: prompts, answers and exception messages reach this service's logs and spans; "
    "turn it off outside debugging"
)


def warn_if_capturing(service: str, capture_content: bool) -> None:
    if capture_content:
        log.warning(CAPTURE_WARNING, service)


def content_free_traceback(error: BaseException) -> str:
    """The traceback of ``error`` and the errors it was raised from: frames and types, no messages."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current, link = error, ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    lines: list[str] = []
    for exception, link in reversed(chain):
        if exception.__traceback__ is not None:
            lines.append("Traceback (most recent call last):\n")
            lines += traceback.format_tb(exception.__traceback__)
        kind = type(exception)
        lines.append(f"{kind.__module__}.{kind.__qualname__} (message withheld: capture_content is off)\n")
        if link:
            lines.append(link)
    return "".join(lines).rstrip("\n")
