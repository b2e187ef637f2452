"""A baseline measured in a process of its own: one JSON request a line on its stdin, one answer a line on
its stdout (``{"value": ...}`` or ``{"error": ...}``). Used by bench/hf_generate.py and bench/llama_cpp.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable


class WorkerProcess:
    """The bench's side: starts ``python -m <module> <args>`` and asks it for figures."""

    def __init__(self, module: str, *args: str):
        self._name = module
        self._process = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)

    def ask(self, **request) -> float:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self._name} ended (exit {self._process.wait(timeout=10)})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self._name}: {answer['error']}")
        return answer["value"]

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()


def serve(handlers: dict[str, Callable[[dict], float]]) -> None:
    """The worker's side: answers each request line by its ``op``'s handler until stdin closes."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            print(json.dumps({"value": handlers[request["op"]](request)}), flush=True)
        except Exception as error:  # reported to the bench, which stops with it
            print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
