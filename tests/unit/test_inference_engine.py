"""The engine on tiny random models (a Llama unless a test names each family): determinism, sampling, limits,
cancellation, the families it runs."""
import asyncio
import time

import pytest

from meshkit.errors import InvalidArgument, ResourceExhausted, Unavailable
from meshkit.sampling import Sampling
from services.inference.generation_types import Delta, Finished, FinishReason, GenerationRequest
from tests.polling import until, wait_until
from tests.tiny_models import FAMILIES, real_tokenizer, tiny_engine, tiny_llama, tiny_model

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "日本語のテキスト"]
LONG = 2000  # more tokens than a test ever waits for


@pytest.fixture
def engine():
    engine = tiny_engine(max_running=4, max_queue=4)
    yield engine
    engine.close()


def request(prompt: str, **sampling) -> GenerationRequest:
    return GenerationRequest(real_tokenizer().encode(prompt), Sampling(**sampling), prompt)


async def collect(stream) -> tuple[str, Finished]:
    items = [item async for item in stream]
    assert all(isinstance(item, Delta) for item in items[:-1])
    return "".join(item.text for item in items[:-1]), items[-1]


async def generate(engine, prompt: str, **sampling) -> tuple[str, Finished]:
    return await collect(engine.submit(request(prompt, **sampling)))


def run(engine, prompt: str, **sampling) -> tuple[str, Finished]:
    return asyncio.run(generate(engine, prompt, **sampling))


async def wait_idle(engine, within_s: float = 1.0) -> None:
    # Well under the time a LONG request would take to finish by itself.
    await until(lambda: not engine.active_count, timeout_s=within_s, every_s=0.01, what="the engine to go idle")
    assert engine.active_count == 0 and engine.queue_depth == 0


@pytest.mark.parametrize("precision", [None, "int8", "float32"])  # None: the model's own forward and layers
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_the_same_alone_and_alongside_other_requests(family, precision):
    from services.inference.precision import apply_precision

    model = tiny_model(family) if precision is None else apply_precision(tiny_model(family), precision)
    engine = tiny_engine(model, max_running=4, max_queue=4)
    try:
        alone = [run(engine, prompt, max_new_tokens=24)[0] for prompt in PROMPTS]

        async def together():
            return await asyncio.gather(*(generate(engine, p, max_new_tokens=24) for p in PROMPTS))

        concurrent = [text for text, _ in asyncio.run(together())]
    finally:
        engine.close()
    assert concurrent == alone
    assert len(set(alone)) == len(PROMPTS)


def test_a_model_of_a_family_the_engine_does_not_run_is_refused_at_start_with_its_type_named():
    from transformers import MistralConfig, MistralForCausalLM

    from modelfiles.architectures import UnsupportedArchitecture

    model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedArchitecture, match=r"model type 'mistral'.*runs: llama, qwen2, qwen3, gemma3"):
        tiny_engine(model)


def test_a_gemma_asking_for_an_attention_logit_softcap_is_refused_at_start():
    from modelfiles.architectures import UnsupportedArchitecture

    model = tiny_model("gemma3")
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedArchitecture, match="attn_logit_softcapping"):
        tiny_engine(model)


def test_the_families_end_of_turn_token_stops_beside_the_generation_configs_eos():
    from services.inference.engine import eos_token_ids
    from services.inference.families import GEMMA3, LLAMA

    class Vocabulary:  # the part of a tokenizer eos_token_ids reads
        def get_vocab(self):
            return {"<eos>": 1, "<end_of_turn>": 106}

    model = tiny_model("gemma3")
    model.generation_config.eos_token_id = 1
    assert eos_token_ids(model, Vocabulary(), GEMMA3) == {1, 106}
    assert eos_token_ids(model, Vocabulary(), LLAMA) == {1}
    model.generation_config.eos_token_id = [1, 7]
    assert eos_token_ids(model, real_tokenizer(), GEMMA3) == {1, 7}  # a tokenizer without the token: none added


def test_max_new_tokens_ends_with_length_after_exactly_that_many_tokens(engine):
    text, finished = run(engine, "Hello there", max_new_tokens=7)
    assert finished.finish_reason == FinishReason.LENGTH
    assert finished.completion_tokens == 7
    assert finished.prompt_tokens == len(real_tokenizer().encode("Hello there"))
    assert text


def test_text_joins_to_the_decode_of_the_generated_tokens():
    model = tiny_llama()
    engine = tiny_engine(model)
    try:
        text, _ = run(engine, "日本語", max_new_tokens=40)
    finally:
        engine.close()
    prompt = real_tokenizer().encode("日本語", return_tensors="pt")
    ids = model.generate(prompt, do_sample=False, max_new_tokens=40)[0, prompt.shape[1] :]
    assert text == real_tokenizer().decode(ids, skip_special_tokens=True)


def test_the_end_of_sequence_token_ends_with_stop():
    model = tiny_llama()
    prompt = real_tokenizer().encode("Hi", return_tensors="pt")
    first_token = int(model.generate(prompt, do_sample=False, max_new_tokens=1)[0, -1])
    model.generation_config.eos_token_id = first_token  # so greedy hits "EOS" at once
    engine = tiny_engine(model)
    try:
        text, finished = run(engine, "Hi", max_new_tokens=10)
    finally:
        engine.close()
    assert (text, finished.finish_reason, finished.completion_tokens) == ("", FinishReason.STOP, 1)


def test_a_stop_sequence_cuts_the_text_before_it(engine):
    full, _ = run(engine, "Hello there", max_new_tokens=24)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    text, finished = run(engine, "Hello there", max_new_tokens=24, stop=("never seen", stop))
    assert finished.finish_reason == FinishReason.STOP_SEQUENCE
    assert text == full[: full.index(stop)]
    assert finished.completion_tokens < 24


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    first = run(engine, "Hello there", max_new_tokens=16, temperature=1.0, seed=7)[0]
    again = run(engine, "Hello there", max_new_tokens=16, temperature=1.0, seed=7)[0]
    others = {run(engine, "Hello there", max_new_tokens=16, temperature=1.0, seed=s)[0] for s in (1, 2, 3)}
    assert first == again
    assert len(others | {first}) > 1


def test_seeded_sampling_is_reproducible_alongside_other_requests(engine):
    alone = run(engine, "Hello there", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)[0]

    async def together():
        others = [generate(engine, p, max_new_tokens=16, temperature=1.0) for p in PROMPTS[1:]]
        mine = generate(engine, "Hello there", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11)
        return (await asyncio.gather(mine, *others))[0][0]

    assert asyncio.run(together()) == alone


def test_top_k_one_samples_the_greedy_answer(engine):
    greedy = run(engine, "Hello there", max_new_tokens=16)[0]
    assert run(engine, "Hello there", max_new_tokens=16, temperature=1.5, top_k=1)[0] == greedy
    assert run(engine, "Hello there", max_new_tokens=16, temperature=1.5, top_p=1e-6)[0] == greedy


def test_cancel_mid_generation_frees_the_engine(engine):
    async def main():
        stream = engine.submit(request("Hello there", max_new_tokens=LONG))
        first = await anext(stream)
        assert isinstance(first, Delta) and engine.active_count == 1
        stream.cancel()
        _, finished = await collect(stream)
        assert finished.finish_reason == FinishReason.CANCELLED
        assert 0 < finished.completion_tokens < LONG
        await wait_idle(engine)

    asyncio.run(main())


def test_leaving_the_stream_early_cancels_it(engine):
    async def main():
        async with engine.submit(request("Hello there", max_new_tokens=LONG)) as stream:
            async for _ in stream:
                break
        await wait_idle(engine)

    asyncio.run(main())


def test_dropping_an_unfinished_stream_cancels_it(engine):
    async def main():
        stream = engine.submit(request("Hello there", max_new_tokens=LONG))
        await anext(stream)
        del stream
        await wait_idle(engine)

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_a_queued_cancel_frees_its_place():
    engine = tiny_engine(max_running=1, max_queue=1)

    async def main():
        running = engine.submit(request("Hello there", max_new_tokens=LONG))
        queued = engine.submit(request("Hello there", max_new_tokens=LONG))
        with pytest.raises(ResourceExhausted) as refused:
            engine.submit(request("Hello there", max_new_tokens=4))
        assert refused.value.retry_after_s > 0
        await anext(running)  # the first runs, so the second is the one waiting
        assert (engine.active_count, engine.queue_depth) == (2, 1)
        queued.cancel()
        assert (engine.active_count, engine.queue_depth) == (1, 0)
        assert (await anext(queued)).finish_reason == FinishReason.CANCELLED
        running.cancel()
        await wait_idle(engine)

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_invalid_requests_are_refused_with_the_field_named(engine):
    with pytest.raises(InvalidArgument) as caught:
        engine.submit(request("Hello there", top_p=1.5))
    assert [v.field for v in caught.value.violations] == ["sampling.top_p"]
    with pytest.raises(InvalidArgument) as caught:
        engine.submit(request("Hello " * 2100, max_new_tokens=2000))  # context: 4096
    assert [v.field for v in caught.value.violations] == ["prompt"]
    assert engine.active_count == 0


def test_closing_the_engine_ends_running_and_queued_requests_with_unavailable():
    engine = tiny_engine(max_running=1, max_queue=1)

    async def main():
        running = engine.submit(request("Hello there", max_new_tokens=LONG))
        queued = engine.submit(request("Hello there", max_new_tokens=LONG))
        await anext(running)
        await asyncio.to_thread(engine.close)
        for stream in (running, queued):
            with pytest.raises(Unavailable):
                await asyncio.wait_for(drain(stream), timeout=10)  # a hang here is the failure

    async def drain(stream):
        async for _ in stream:
            pass

    asyncio.run(main())


def _run_long_prompt(engine) -> None:
    ids = real_tokenizer().encode("one two three four five six seven eight " * 80)[:700]  # past INITIAL_CAPACITY

    async def once():
        return await collect(engine.submit(GenerationRequest(ids, Sampling(max_new_tokens=1))))
    asyncio.run(once())


@pytest.mark.parametrize("idle_s", [0.0, 0.5])
def test_a_long_prompts_kv_buffers_are_kept_while_busy_and_given_back_once_idle(idle_s):
    engine = tiny_engine(max_running=2, max_queue=2, kv_shrink_idle_s=idle_s)
    try:
        _run_long_prompt(engine)
        grown_at = time.monotonic()
        if idle_s:  # kept: the next long prompt does not grow them again, stalling the running streams
            assert engine._kv.capacity >= 1024
            _run_long_prompt(engine)
            assert engine._kv.capacity >= 1024
        wait_until(lambda: engine._kv.capacity == 0, timeout_s=idle_s + 5.0, every_s=0.02,
                   what="the idle engine to give its KV buffers back")
        assert time.monotonic() - grown_at >= idle_s * 0.9
    finally:
        engine.close()


def test_a_burst_on_an_idle_engine_is_all_prefilled_before_decoding_starts():
    # Nothing decodes yet, so nothing can stall: every prompt of the burst gets its first token
    # before any stream gets its second (chunking and layer groups apply once decoding runs).
    engine = tiny_engine(max_running=4, max_queue=4)
    order: list[tuple[int, int]] = []  # (stream, its token number), as delivered

    async def one(index: int, stream) -> None:
        seen = 0
        async with stream:
            async for item in stream:
                if isinstance(item, Delta):
                    seen += 1
                    order.append((index, seen))

    async def burst() -> None:
        # All submitted before the worker may take any (the engine's lock is reentrant): a burst
        # by construction, not by the timing of four submits on a busy machine.
        with engine._lock:
            streams = [engine.submit(request(prompt, max_new_tokens=4)) for prompt in PROMPTS]
        await asyncio.gather(*(one(index, stream) for index, stream in enumerate(streams)))

    try:
        asyncio.run(burst())
    finally:
        engine.close()
    firsts = [position for position, (_, seen) in enumerate(order) if seen == 1]
    seconds = [position for position, (_, seen) in enumerate(order) if seen == 2]
    assert len(firsts) == len(PROMPTS) and seconds
    assert max(firsts) < min(seconds), order


def test_the_start_up_checks_run_on_the_engines_worker_thread_and_a_refusal_is_raised_to_the_caller(monkeypatch):
    """torch work outside the worker would leave a second OpenMP team alive, which halves the decode
    speed on a 2-core machine (services/inference/threads.py)."""
    import threading

    from services.inference import engine as engine_module
    from services.inference.kernel_checks import RowDependence
    from services.inference.precision import apply_precision

    ran_on = []
    real = engine_module._check_kernels

    def recording(model, options):
        ran_on.append(threading.current_thread().name)
        real(model, options)

    monkeypatch.setattr(engine_module, "_check_kernels", recording)
    engine = tiny_engine(apply_precision(tiny_llama(), "int8"))
    try:
        assert ran_on == ["inference-engine"]
    finally:
        engine.close()

    def refusing(model, options):
        raise RowDependence("precision int8 cannot keep greedy output independent of the batch on this CPU")

    monkeypatch.setattr(engine_module, "_check_kernels", refusing)
    before = {thread.name for thread in threading.enumerate()}
    with pytest.raises(RowDependence, match="independent of the batch"):
        tiny_engine(apply_precision(tiny_llama(), "int8"))
    assert "inference-engine" not in {thread.name for thread in threading.enumerate()} - before


def test_work_in_a_thread_that_ends_returns_its_result_or_raises_its_error_in_the_caller():
    import threading

    from services.inference.threads import in_thread_that_ends

    assert in_thread_that_ends(lambda: threading.current_thread().name, "passing") == "passing"
    with pytest.raises(ValueError, match="bad"):
        in_thread_that_ends(lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_two_engines_in_one_process_keep_their_own_kernel_settings():
    """The start-up choices (prefill tiles' placement, a one-tile GEMM's parts) are each engine's model's:
    a second engine starting in the process, with other options, leaves the first one's as they were."""
    from services.inference.precision import apply_precision
    from services.inference.tiles import BY_POSITION, FROM_START

    first = tiny_engine(apply_precision(tiny_llama(), "float32"), threads=1)
    try:
        # Set against what this CPU allows, so the second engine's own choice can only differ from it.
        first.kernels.placement = FROM_START if first.kernels.placement == BY_POSITION else BY_POSITION
        chosen = first.kernels.placement
        second = tiny_engine(apply_precision(tiny_llama(), "float32"), threads=2)
        try:
            assert second.kernels is not first.kernels
            assert second.kernels.placement != chosen
            assert (first.kernels.placement, first.kernels.one_tile_parts) == (chosen, 1)
        finally:
            second.close()
    finally:
        first.close()


def test_the_start_up_refusal_list_names_exactly_the_families_the_engine_knows():
    """modelfiles sits below services, so it keeps its own list: this keeps the two from drifting apart."""
    from modelfiles.architectures import BUILT_IN_ENGINE
    from services.inference.families import FAMILIES as KNOWN

    assert sorted(family.name for family in KNOWN) == sorted(BUILT_IN_ENGINE) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_past_the_sliding_window_are_those_of_transformers_generate(family):
    """transformers builds its own masks (Gemma's sliding window among them) and its own cache; the engine's
    float32 answer for a prompt longer than the tiny Gemma's window is the same tokens. Were the window
    ignored, the answer would differ (checked, so the test can fail)."""
    import torch

    from services.inference.precision import apply_precision
    from tests.tiny_models import EOS_ID, SLIDING_WINDOW

    prompt = [3 + (i * 37) % 5000 for i in range(2 * SLIDING_WINDOW + 7)]

    def engine_answer(model) -> str:
        engine = tiny_engine(apply_precision(model, "float32"))

        async def answer():
            return await collect(engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=16))))

        try:
            return asyncio.run(answer())[0]
        finally:
            engine.close()

    with torch.inference_mode():
        output = tiny_model(family).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                              eos_token_id=EOS_ID)
    expected = real_tokenizer().decode(output[0, len(prompt) :].tolist(), skip_special_tokens=True)
    assert expected and engine_answer(tiny_model(family)) == expected
    if family in ("gemma3", "qwen2"):  # the tiny ones with a sliding-window layer
        unwindowed = tiny_model(family)
        unwindowed.config.sliding_window = 10**6
        assert engine_answer(unwindowed) != expected


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_tiny_model_of_each_family_loads_the_way_a_converted_one_does_and_answers_as_before(family, tmp_path):
    """load_model reads a folder with transformers' Auto classes, as for a converted model: each family's
    class comes back, and the engine gives the answer of the model it was saved from."""
    from modelfiles.convert import ModelFiles
    from services.inference.loading import load_model
    from services.inference.precision import apply_precision

    tiny_model(family).save_pretrained(tmp_path)
    real_tokenizer().save_pretrained(tmp_path)
    files = ModelFiles(name=f"tiny-{family}", path=tmp_path, revision="test", model_id="tiny", architecture=family)
    loaded, _ = load_model(files, "int8")
    assert type(loaded) is type(tiny_model(family))
    answers = []
    for model in (loaded, apply_precision(tiny_model(family), "int8")):
        engine = tiny_engine(model)
        try:
            answers.append(run(engine, "The capital of France is", max_new_tokens=12)[0])
        finally:
            engine.close()
    assert answers[0] and answers[0] == answers[1]
