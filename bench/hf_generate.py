"""transformers' ``generate`` as a baseline, in a process of its own (``python -m bench.hf_generate``).

The bench's engine runs its forwards on its worker thread, as the inference service
does; ``generate`` in the bench's own threads would keep a second OpenMP team alive
beside the worker's, and with more OpenMP threads than cores libgomp makes both
teams sleep between parallel regions, which slows both (services/inference/threads.py).
So ``generate`` runs here, on the same converted model files in the same precision
(``load_model``: the very weights the engine has), its torch work in this process's
main thread only; one JSON request a line on stdin, one answer a line on stdout.
"""
from __future__ import annotations

import json
import subprocess
import sys


class HfGenerate:
    """The client: starts ``python -m bench.hf_generate`` and asks it for figures."""

    def __init__(self, dtype: str, threads: int):
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.hf_generate", dtype, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, **request) -> float:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the generate process ended (exit {self._process.wait(timeout=10)})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"generate: {answer['error']}")
        return answer["value"]

    def decode_tok_s(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        return self._ask(op="decode_tok_s", prompts=prompts, max_new_tokens=max_new_tokens)

    def first_token_ms(self, prompt: list[int]) -> float:
        return self._ask(op="first_token_ms", prompt=prompt)

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()


def _serve(dtype: str, threads: int) -> None:
    import torch

    from bench.generation import hf_decode_tok_s, hf_first_token_ms
    from meshkit.settings import default_home
    from modelfiles.convert import load_model_files
    from services.inference.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(load_model_files(default_home()), dtype)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "decode_tok_s":
                value = hf_decode_tok_s(model, tokenizer, request["prompts"], request["max_new_tokens"])
            else:
                value = hf_first_token_ms(model, request["prompt"])
            print(json.dumps({"value": value}), flush=True)
        except Exception as error:  # reported to the bench, which stops with it
            print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
