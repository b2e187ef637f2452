"""The one place a prompt and its answer may reach a span: the gateway's request span, when
``capture_content`` is on (meshkit/content_capture.py). Off, these are never called."""
from __future__ import annotations

import json

from opentelemetry import trace

from gateway.request import Chat, TemplateCall
from meshkit import span_names as names


def record_prompt(span: trace.Span, prompt: TemplateCall | Chat) -> None:
    """The prompt as the caller sent it: chat messages, or a template and its variables."""
    if isinstance(prompt, Chat):
        sent = [{"role": role, "content": content} for role, content in prompt.messages]
    else:
        sent = {"template": prompt.id, "version": prompt.version, "variables": prompt.variables}
    span.set_attribute(names.GEN_AI_PROMPT, json.dumps(sent, ensure_ascii=False, default=str))


def record_completion(span: trace.Span, text: str) -> None:
    span.set_attribute(names.GEN_AI_COMPLETION, text)
