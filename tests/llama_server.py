"""`python -m tests.llama_server ARGS`: llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server ARGS`),
with llama.cpp's weight repacking for the CPU's extra buffer types turned off.

llama-cpp-python 0.3.36 repacks q4_1 weights for AMX where the CPU has it, and its batched prefill then
crashes (SIGSEGV in llama_decode) on any prompt of more than a token or two; without the repack it runs.
The server has no option for it (llama.cpp's own server has --no-repack), so the model's default
parameters are changed before it loads the model.
"""
from __future__ import annotations

import sys

import llama_cpp.llama_cpp as bindings
from llama_cpp.server.__main__ import main

_defaults = bindings.llama_model_default_params


def _without_repack():
    params = _defaults()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    bindings.llama_model_default_params = _without_repack
    sys.exit(main())
