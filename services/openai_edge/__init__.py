"""The OpenAI-compatible HTTP edge: /v1/chat/completions, /v1/completions and /v1/models, served by starlette and
uvicorn, each call made to the gateway's gRPC API (so keys, tenants, quotas, budgets, the cache and traces apply)."""
