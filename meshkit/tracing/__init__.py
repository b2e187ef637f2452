"""Tracing for every nlpmesh process, one module per job.

- ``provider``: ``configure_tracing`` (once per process, in ``main()``), the
  service's ``tracer``, the exporters it picks (OTLP, span files, none) and
  ``ChosenIds``, the id generator that lets a server span choose its ids early.
- ``span_file``: the span-file format, both sides of it: ``SpanFileExporter``
  writes ``<trace_dir>/<service>.jsonl``, one span per line (``span_line``);
  ``read_spans`` reads those files back into ``SpanRecord``\\s for the CLI.
- ``propagation``: W3C trace context in gRPC metadata, in (``extract_context``)
  and out (``outgoing_metadata``, ``current_metadata``).
- ``server_span``: the interceptor that runs each served call in a SERVER span
  (``server_interceptors``) and ``request_span`` for handlers.
- ``stand_in``: spans whose SDK span is made once the request has gone on
  (``start_span_later``, ``span_later``, ``StandInSpan``): the served calls' spans, the
  gateway's hop spans, the tokenizer's and the inference adapter's.

Span and attribute names live in ``meshkit.span_names``. The gateway's hop
spans are the gateway's own: ``gateway/hop_spans.py``.
"""
