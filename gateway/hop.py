"""The hops of a request, by their public names (the API's ``HopTiming.hop``)."""
from __future__ import annotations

import enum


class Hop(enum.StrEnum):
    CACHE = "cache"
    TEMPLATE = "template"
    TOKENIZER = "tokenizer"
    INFERENCE_TTFT = "inference.ttft"  # time to first token, inside the inference hop
    INFERENCE = "inference"
    EMBEDDING = "embedding"  # Embed's call to an embedding replica
    TOTAL = "total"  # the gateway's own wall time against the request's total budget
    # A request answered by a generation another identical request started (gateway/coalescing.py):
    # its wait for that answer, in place of its own template, tokenizer and inference hops.
    COALESCED = "coalesced"


# The hops a budget policy gives a share to (every hop but the total and a follower's wait).
BUDGETED = tuple(hop for hop in Hop if hop not in (Hop.TOTAL, Hop.COALESCED))


def budgeted_as(hop: Hop) -> Hop:
    """The hop whose budget ``hop`` is held to: a follower waits for a generation, so the inference hop's."""
    return Hop.INFERENCE if hop is Hop.COALESCED else hop
