"""`python -m bench.instant_engine --port N --model NAME`: an OpenAI-compatible engine that answers at once.

It does no work: ``/v1/completions`` streams ``max_tokens`` chunks of one word each as soon as the request
has arrived, then ``[DONE]``; ``/v1/models`` lists NAME. bench/external_engine.py puts it behind the adapter
beside llama.cpp's server, so that what the mesh adds to a first token is measured with no engine time in it
at all, as on a deployment where the engine runs on machines of its own (there, the mesh's processes do not
share their cores with the engine's prefill and decode). It is a yardstick for the bench, never an engine to
serve.
"""
from __future__ import annotations

import argparse
import json

from aiohttp import web

WORD = " ok"


def app(model: str) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = max(1, int(body.get("max_tokens") or 1))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(tokens):
            last = index == tokens - 1
            chunk = {"id": "instant", "object": "text_completion", "model": model,
                     "choices": [{"index": 0, "text": WORD, "finish_reason": "length" if last else None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    application = web.Application()
    application.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    web.run_app(app(args.model), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
