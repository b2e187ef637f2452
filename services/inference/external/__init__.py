"""The inference hop in front of an external engine: nlpmesh.inference.v1 on one side, an OpenAI-compatible
server's streamed /v1/completions (vLLM, SGLang, TGI, llama.cpp's) on the other (docs/operating/external-engine.md)."""
