"""The hops of a request, by their public names (the API's ``HopTiming.hop``)."""
from __future__ import annotations

import enum


class Hop(enum.StrEnum):
    CACHE = "cache"
    TEMPLATE = "template"
    TOKENIZER = "tokenizer"
    INFERENCE_TTFT = "inference.ttft"  # time to first token, inside the inference hop
    INFERENCE = "inference"
    TOTAL = "total"  # the gateway's own wall time against the request's total budget


# The hops a budget policy gives a share to (every hop but the total).
BUDGETED = tuple(hop for hop in Hop if hop is not Hop.TOTAL)
