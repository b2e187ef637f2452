"""Requests the gateway refused for saturation, before any hop: admission control (gateway/capacity.py) and
tenant quotas (gateway/quotas.py). The alert rules read them (deploy/prometheus/rules/nlpmesh.yml). Labels take
fixed values only: the refusal's reason, the quota's limit; never a tenant or a key."""
from __future__ import annotations

from prometheus_client import Counter

ADMISSION_REFUSALS = Counter(
    "nlpmesh_gateway_admission_refusals_total",
    "Generations refused by admission control, by reason (GATEWAY_AT_CAPACITY, INFERENCE_AT_CAPACITY).",
    ["reason"],
)
QUOTA_REFUSALS = Counter(
    "nlpmesh_gateway_quota_refusals_total",
    "Requests refused for a tenant's quota, by the limit exceeded (requests_per_s, tokens_per_min, max_streams).",
    ["limit"],
)
for _reason in ("GATEWAY_AT_CAPACITY", "INFERENCE_AT_CAPACITY"):  # exported at 0 before the first refusal
    ADMISSION_REFUSALS.labels(_reason)
for _limit in ("requests_per_s", "tokens_per_min", "max_streams"):
    QUOTA_REFUSALS.labels(_limit)
