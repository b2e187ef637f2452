"""When a failed attempt is tried again: only RESOURCE_EXHAUSTED and UNAVAILABLE, a bounded number of times,
never sooner than the server's RetryInfo says, with jitter so that refused callers do not return in step."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from nlpmesh_client.errors import NlpmeshError

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3  # the first try included; 1 = never retry
    backoff_s: float = 0.2  # the first wait when the server sent no RetryInfo; doubled each attempt
    max_delay_s: float = 10.0  # a longer wait than this (RetryInfo's included) is not waited for
    jitter: float = 0.2  # each wait grows by up to this fraction, at random
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self):
        if self.max_attempts < 1 or self.backoff_s < 0 or self.max_delay_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("retry policy: max_attempts >= 1, backoff_s and max_delay_s >= 0, jitter in [0, 1]")

    def delay_s(self, error: NlpmeshError, attempt: int, time_left_s: float) -> float | None:
        """How long to wait before attempt ``attempt + 1`` after ``error`` ended attempt ``attempt``
        (1-based); None: do not retry."""
        if error.code not in RETRYABLE or attempt >= self.max_attempts:
            return None
        base = error.retry_after_s if error.retry_after_s is not None else self.backoff_s * 2 ** (attempt - 1)
        delay = base * (1 + self.jitter * self.random())  # never sooner than RetryInfo
        if delay > self.max_delay_s or delay >= time_left_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
