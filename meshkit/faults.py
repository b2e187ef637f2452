"""Fault injection for tests: a delay added to every call a service serves.

Set ``NLPMESH_<SERVICE>_FAULT_DELAY_MS``; zero (the default) installs nothing.
"""
from __future__ import annotations

import asyncio

import grpc

from meshkit.interceptor import PLATFORM_METHODS


class DelayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, delay_ms: float):
        self._delay_s = delay_ms / 1000.0

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(PLATFORM_METHODS):
            await asyncio.sleep(self._delay_s)
        return await continuation(handler_call_details)
