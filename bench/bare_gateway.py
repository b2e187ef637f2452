"""`python -m bench.bare_gateway --port N --tokenizer ADDR --inference MODEL=ADDR ...`: a gateway of hops alone.

It serves the gateway's ``GenerateStream`` as the two calls a chat needs and nothing else: the tokenizer's
``EncodeChat``, then ``Generate`` on the model's inference service, whose deltas it passes on. No keys,
quotas, budgets, prompt cache, routing, retries, traces, metrics or logs. bench/external_engine.py calls it
beside the gateway, in the same turns, so that what three Python gRPC hops cost on the machine (the caller
to a gateway, the tokenizer, the inference service) is measured in the same run as what the mesh adds: the
difference is the gateway's own work. A yardstick for the bench, never a gateway to serve.
"""
from __future__ import annotations

import argparse

import grpc
import uvloop
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

HOP_TIMEOUT_S = 30.0


class BareGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, tokenizer: str, inference: dict[str, str]):
        self._tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(grpc.aio.insecure_channel(tokenizer))
        self._inference = {model: inference_pb2_grpc.InferenceServiceStub(grpc.aio.insecure_channel(address))
                           for model, address in inference.items()}

    async def GenerateStream(self, request, context):
        inference = self._inference.get(request.model)
        if inference is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r} here")
        encoded = await self._tokenizer.EncodeChat(tokenizer_pb2.EncodeChatRequest(
            model=request.model, messages=[tokenizer_pb2.Message(role=m.role, content=m.content)
                                           for m in request.chat.messages]), timeout=HOP_TIMEOUT_S)
        generate = inference_pb2.GenerateRequest(
            model=request.model, prompt_token_ids=encoded.token_ids,
            sampling=inference_pb2.Sampling(max_new_tokens=request.sampling.max_new_tokens))
        async for chunk in inference.Generate(generate, timeout=HOP_TIMEOUT_S):
            if chunk.delta:
                yield gateway_pb2.GenerateChunk(delta=chunk.delta)
            if chunk.done:
                yield gateway_pb2.GenerateChunk(done=True, finish_reason=chunk.finish_reason, usage=gateway_pb2.Usage(
                    prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens))


async def serve(port: int, tokenizer: str, inference: dict[str, str]) -> None:
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(BareGateway(tokenizer, inference), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer", required=True, help="the tokenizer service's host:port")
    parser.add_argument("--inference", action="append", required=True, metavar="MODEL=ADDRESS",
                        help="a model's inference service (repeat for each model)")
    args = parser.parse_args()
    inference = dict(entry.split("=", 1) for entry in args.inference)
    uvloop.run(serve(args.port, args.tokenizer, inference))


if __name__ == "__main__":
    main()
