"""Guided decoding's cost (issue 24), each figure beside free decoding in the same run, rounds interleaved:

- decode tok/s at 1 and 8 streams: greedy answers held to a 20-field JSON Schema against free greedy answers,
  the engine in this process (the real default model); the steady rate while every stream decodes
  (bench/engine_speed.py's ``steady_tok_s``), so answers of different lengths compare;
- the first token: its time from submit with a schema never seen (the grammar compiled on the request's path:
  a cold grammar cache), with the schema seen before (a warm cache), and with no schema.

`python -m bench.run --only guided`.
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import torch

from bench.engine_speed import engine_streams, steady_tok_s
from meshkit.percentile import percentile
from meshkit.response_format import ResponseFormat
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.engine import Engine
from services.inference.loading import load_model
from services.inference.settings import InferenceSettings

STREAMS = (1, 8)
FORM_FIELDS = 20
PROMPT = ("Fill in the customer form for Anna Berg, 34, of Oslo: order 5521, two items, paid by card, "
          "delivery next week, no gift wrap. Answer with the form as JSON.")


def say(line: str) -> None:
    print(f"[bench guided] {line}", flush=True)


def form_schema(salt: str = "") -> str:
    """A 20-field form: integers with ranges, enums, booleans and short strings. ``salt`` renames a field,
    which makes a schema the engine has not compiled (a cold grammar cache)."""
    kinds = ({"type": "integer", "minimum": 0, "maximum": 9999}, {"enum": ["card", "cash", "transfer"]},
             {"type": "boolean"}, {"type": "string", "maxLength": 24})
    properties = {f"field_{index:02d}{salt}": kinds[index % len(kinds)] for index in range(FORM_FIELDS)}
    return json.dumps({"type": "object", "additionalProperties": False, "required": sorted(properties),
                       "properties": properties})


def bench(rounds: int) -> dict:
    settings = InferenceSettings()
    torch.set_num_threads(settings.threads)
    say("loading the default model into an engine in this process")
    model, tokenizer = _loaded(settings)
    engine = Engine(model, tokenizer, settings.engine_options())
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        schema = ResponseFormat("json_schema", form_schema())
        engine.prepare_guided()  # the vocabulary's view is made at the service's warm-up, never on a request
        guided_tokens = engine_streams(engine, [prompt], 512, schema)[0].tokens
        say(f"a guided answer is {guided_tokens} tokens; free answers decode as many")
        decode: dict[str, list[float]] = {f"{kind}_c{n}": [] for n in STREAMS for kind in ("free", "guided")}
        first: dict[str, list[float]] = {"free": [], "guided_warm": [], "guided_cold": []}
        for round_index in range(rounds):
            for n in STREAMS:
                for kind, response_format in (("free", None), ("guided", schema)):
                    streams = engine_streams(engine, [prompt] * n, guided_tokens, response_format)
                    decode[f"{kind}_c{n}"].append(steady_tok_s(streams))
            for kind, response_format in (("free", None), ("guided_warm", schema),
                                          ("guided_cold", ResponseFormat("json_schema",
                                                                         form_schema(f"_r{round_index}")))):
                started = time.perf_counter()
                arrivals = engine_streams(engine, [prompt], 2, response_format)[0]
                first[kind].append(1000 * (arrivals[0] - started))
            say(f"round {round_index + 1}/{rounds} done")
    finally:
        engine.close()
    result = {"guided_tokens": guided_tokens, "fields": FORM_FIELDS, "rounds": rounds,
              "decode_tok_s": {name: statistics.median(values) for name, values in decode.items()},
              "first_token_ms": {name: {"p50": statistics.median(values), "p99": percentile(values, 99)}
                                 for name, values in first.items()}}
    for n in STREAMS:
        result["decode_tok_s"][f"guided_over_free_c{n}"] = (result["decode_tok_s"][f"guided_c{n}"]
                                                           / result["decode_tok_s"][f"free_c{n}"])
    free_ms = result["first_token_ms"]["free"]["p50"]
    result["first_token_extra_ms"] = {kind: result["first_token_ms"][kind]["p50"] - free_ms
                                      for kind in ("guided_warm", "guided_cold")}
    return result


def _loaded(settings: InferenceSettings):
    """The model loaded in a thread that ends (as the service does: its OpenMP team stays the engine's)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        loaded=load_model(load_model_files(default_home()), settings.dtype)))
    worker.start()
    worker.join()
    return out["loaded"]


def lines(result: dict) -> list[str]:
    tok_s, first, extra = result["decode_tok_s"], result["first_token_ms"], result["first_token_extra_ms"]
    out = [f"guided decoding, a {result['fields']}-field JSON Schema, {result['guided_tokens']}-token answers, "
           f"{result['rounds']} rounds"]
    for n in STREAMS:
        out.append(f"  decode c{n}: guided {tok_s[f'guided_c{n}']:.1f} tok/s, free {tok_s[f'free_c{n}']:.1f} tok/s "
                   f"({tok_s[f'guided_over_free_c{n}']:.3f}x)")
    out.append(f"  first token p50: free {first['free']['p50']:.1f} ms; guided warm {extra['guided_warm']:+.1f} ms, "
               f"cold {extra['guided_cold']:+.1f} ms")
    return out
