"""`python -m tests.llama_server ARGS`: llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server ARGS`),
with llama.cpp's weight repacking for the CPU's extra buffer types turned off (bench/llama_cpp.py
``turn_off_repacking`` says why).
"""
from __future__ import annotations

import sys

from llama_cpp.server.__main__ import main

from bench.llama_cpp import turn_off_repacking

if __name__ == "__main__":
    turn_off_repacking()
    sys.exit(main())
