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

import sys

from bench.worker_process import WorkerProcess, serve
from modelfiles.convert import DEFAULT_MODEL


class HfGenerate(WorkerProcess):
    """The client: ``python -m bench.hf_generate`` asked for figures."""

    def __init__(self, dtype: str, threads: int, model: str = DEFAULT_MODEL):
        super().__init__("bench.hf_generate", dtype, str(threads), model)

    def decode_tok_s(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        return self.ask(op="decode_tok_s", prompts=prompts, max_new_tokens=max_new_tokens)

    def first_token_ms(self, prompt: list[int]) -> float:
        return self.ask(op="first_token_ms", prompt=prompt)

    def precision(self) -> str:
        """The precision the weights run in (what ``auto`` chose on this CPU, as the inference service does)."""
        return self.ask(op="precision")


def _serve(dtype: str, threads: int, model_id: str) -> None:
    import torch

    from bench.generation import hf_decode_tok_s, hf_first_token_ms
    from meshkit.settings import default_home
    from modelfiles.catalogue import load_catalogue
    from modelfiles.convert import load_model_files
    from services.inference.loading import load_model
    from services.inference.precision import model_precision

    torch.set_num_threads(threads)
    # The precisions the model's catalogue entry allows, as its inference service is limited to them.
    allowed = load_catalogue().get(model_id).precisions
    model, tokenizer = load_model(load_model_files(default_home(), model_id), dtype, allowed=allowed)
    serve({
        "decode_tok_s": lambda request: hf_decode_tok_s(model, tokenizer, request["prompts"],
                                                         request["max_new_tokens"]),
        "first_token_ms": lambda request: hf_first_token_ms(model, request["prompt"]),
        "precision": lambda request: model_precision(model) or str(model.dtype).removeprefix("torch."),
    })


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
