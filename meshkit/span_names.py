"""Span names and attribute keys, in one place for the services, the gateway and the CLI.

Standard keys follow the OpenTelemetry semantic conventions (rpc.*, gen_ai.*);
the ``nlpmesh.*`` keys are ours: the budget of each gateway hop.
"""
from __future__ import annotations

# The resource attribute naming the process that made a span.
SERVICE_NAME = "service.name"
SERVICE_PREFIX = "nlpmesh-"

# Gateway hops (gateway/hop_spans.py: hop_span / record_hop).
HOP_SPAN_PREFIX = "hop "
HOP = "nlpmesh.hop"
BUDGET_MS = "nlpmesh.budget_ms"
ELAPSED_MS = "nlpmesh.elapsed_ms"
OVER_BUDGET = "nlpmesh.over_budget"
# On the request span of a request answered by a generation another identical request started
# (gateway/coalescing.py): "stream" (joined in this gateway) or "stored" (another replica's answer).
COALESCED = "nlpmesh.coalesced"

# Server spans, one per served RPC (meshkit.tracing.server_span.server_interceptors).
RPC_SYSTEM = "rpc.system"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"

# Work inside the services.
TEMPLATE_RENDER = "template render"
TEMPLATE_ID = "nlpmesh.template.id"
TEMPLATE_VERSION = "nlpmesh.template.version"
TOKENIZER_ENCODE = "tokenizer encode"
TOKENIZER_COUNT = "tokenizer count"
TOKEN_COUNT = "nlpmesh.tokens"
REDIS_LOOKUP = "redis lookup"
REDIS_STORE = "redis store"
REDIS_INVALIDATE = "redis invalidate"
CACHE_HIT = "nlpmesh.cache.hit"
# Which tier answered a lookup: "near" (in-process) or "redis".
CACHE_TIER = "nlpmesh.cache.tier"
CACHE_REMOVED = "nlpmesh.cache.removed"
EMBEDDING_FORWARD = "embedding forward"  # one batched forward; its texts in EMBEDDING_BATCH_TEXTS
EMBEDDING_BATCH_TEXTS = "nlpmesh.embedding.batch_texts"
INFERENCE_QUEUE_WAIT = "inference queue wait"
INFERENCE_PREFILL = "inference prefill"
INFERENCE_DECODE = "inference decode"
# An external engine's part of a generation: its HTTP request, from sent to the last byte (services/inference/external).
INFERENCE_ENGINE = "inference engine"
FINISH_REASON = "nlpmesh.finish_reason"

# gen_ai semantic conventions, on the inference spans.
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
# Request text: only with capture_content on (meshkit/content_capture.py), on the gateway's request span.
GEN_AI_PROMPT = "gen_ai.prompt"
GEN_AI_COMPLETION = "gen_ai.completion"
# No registered value fits a self-hosted model; the conventions allow our own.
GEN_AI_SYSTEM_VALUE = "nlpmesh"
GEN_AI_OPERATION_VALUE = "text_completion"
