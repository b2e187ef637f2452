"""The tokenizer service over a real in-process channel, on the real tokenizer files."""
import asyncio
import threading

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from services.tokenizer.servicer import build_spec
from services.tokenizer.settings import TokenizerSettings

CHAT = [
    tokenizer_pb2.Message(role="system", content="Be brief."),
    tokenizer_pb2.Message(role="user", content="Hi!"),
]


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    fields = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def run_against(inprocess_server, scenario, settings: TokenizerSettings | None = None, warm: bool = True):
    """Runs ``scenario(stub, running)`` against a fresh in-process tokenizer service (by default serving
    smollm2 only: one tokenizer loads faster than every converted one)."""
    settings = settings or TokenizerSettings(models="smollm2")

    async def main():
        async with inprocess_server(build_spec(settings), settings, warm=warm) as running:
            return await scenario(tokenizer_pb2_grpc.TokenizerServiceStub(running.channel), running)

    return asyncio.run(main())


async def outcome(call):
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error


def test_encode_count_and_decode_agree(inprocess_server):
    async def scenario(stub, running):
        request = tokenizer_pb2.EncodeChatRequest(messages=CHAT)
        encoded = await stub.EncodeChat(request, timeout=10)
        counted = await stub.CountChat(request, timeout=10)
        decoded = await stub.Decode(tokenizer_pb2.DecodeRequest(token_ids=encoded.token_ids), timeout=10)
        return encoded, counted, decoded

    # No models named: every converted catalogue model, the catalogue's first the default.
    encoded, counted, decoded = run_against(inprocess_server, scenario, TokenizerSettings(models=""))
    assert encoded.model == counted.model == "smollm2"  # the catalogue's default, by its id
    assert counted.count == len(encoded.token_ids) > 0
    assert decoded.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert decoded.text.endswith("<|im_start|>assistant\n")


def test_health_is_serving_only_after_warm_up(inprocess_server):
    async def scenario(stub, running):
        health = health_pb2_grpc.HealthStub(running.channel)
        before = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        early = await outcome(stub.CountChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=5))
        await running.warm_up()
        after = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        ready = await stub.CountChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=10)
        return before, early, after, ready

    before, early, after, ready = run_against(inprocess_server, scenario, warm=False)
    assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert early.code() == grpc.StatusCode.UNAVAILABLE
    assert after.status == health_pb2.HealthCheckResponse.SERVING
    assert ready.count > 0


def test_a_bad_role_is_invalid_argument_naming_the_message(inprocess_server):
    messages = CHAT + [tokenizer_pb2.Message(role="robot", content="beep")]

    async def scenario(stub, running):
        return await outcome(stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(messages=messages), timeout=10))

    error = run_against(inprocess_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["chat.messages[2].role"]


def test_an_empty_chat_is_invalid_argument(inprocess_server):
    async def scenario(stub, running):
        return await outcome(stub.CountChat(tokenizer_pb2.EncodeChatRequest(), timeout=10))

    error = run_against(inprocess_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["chat.messages"]


def test_a_prompt_over_the_context_is_invalid_argument_on_prompt(inprocess_server):
    # Two messages under the per-message limit, ~10 000 tokens together: over the 8192-token context.
    long = [tokenizer_pb2.Message(role="user", content="lorem ipsum " * 2500)] * 2

    async def scenario(stub, running):
        return await outcome(stub.CountChat(tokenizer_pb2.EncodeChatRequest(messages=long), timeout=30))

    error = run_against(inprocess_server, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["prompt"]


def test_an_unknown_model_is_not_found(inprocess_server):
    async def scenario(stub, running):
        request = tokenizer_pb2.EncodeChatRequest(model="gpt-9", messages=CHAT)
        return await outcome(stub.EncodeChat(request, timeout=10))

    error = run_against(inprocess_server, scenario, TokenizerSettings(models="smollm2"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no model 'gpt-9'; this tokenizer serves smollm2"


def test_each_model_is_encoded_with_its_own_tokenizer_and_chat_template(inprocess_server):
    async def scenario(stub, running):
        replies = {}
        for model in ("smollm2", "gemma3", ""):
            encoded = await stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(model=model, messages=CHAT), timeout=10)
            decoded = await stub.Decode(tokenizer_pb2.DecodeRequest(model=model, token_ids=encoded.token_ids),
                                        timeout=10)
            replies[model] = (encoded.model, decoded.text)
        unknown = await outcome(stub.CountChat(tokenizer_pb2.EncodeChatRequest(model="gpt-9", messages=CHAT),
                                               timeout=10))
        return replies, unknown

    replies, unknown = run_against(inprocess_server, scenario, TokenizerSettings(models="smollm2,gemma3"))
    assert replies[""] == replies["smollm2"]  # the first listed is the default
    assert replies["smollm2"][0] == "smollm2" and "<|im_start|>user\nHi!<|im_end|>" in replies["smollm2"][1]
    assert replies["gemma3"][0] == "gemma3" and "<start_of_turn>user\n" in replies["gemma3"][1]
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.details() == "no model 'gpt-9'; this tokenizer serves smollm2, gemma3"


# Legal in the sandbox, and seconds long. Finite: a render cannot be stopped, and the
# loop's shutdown waits for the thread it runs on.
SLOW_CHAT_TEMPLATE = "{% for i in range(100000) %}{% for j in range(5) %}{{ i }}{% endfor %}{% endfor %}"


def serving(inprocess_server, tokenizers, scenario):
    """``scenario(stub)`` against an in-process tokenizer service of ``tokenizers``, warmed up."""
    from meshkit.server import ServiceSpec
    from services.tokenizer.servicer import SERVICE_NAME, TokenizerServicer

    servicer = TokenizerServicer(lambda: tokenizers)
    spec = ServiceSpec(name="tokenizer", service_names=(SERVICE_NAME,), warm_up=servicer.warm_up,
                       register=lambda server: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
                           servicer, server))

    async def main():
        async with inprocess_server(spec, TokenizerSettings()) as running:
            return await scenario(tokenizer_pb2_grpc.TokenizerServiceStub(running.channel))

    return asyncio.run(main())


def default_tokenizer(limits=None):
    """The default model's ChatTokenizer and the transformers tokenizer inside it."""
    from transformers import AutoTokenizer

    from meshkit.settings import default_home
    from modelfiles.convert import load_model_files
    from services.tokenizer.chat_tokenizer import ChatLimits, ChatTokenizer

    files = load_model_files(default_home())
    hf_tokenizer = AutoTokenizer.from_pretrained(files.path)
    return ChatTokenizer(files.model_id, hf_tokenizer, 8192, limits or ChatLimits()), hf_tokenizer


def noting_threads(hf_tokenizer) -> list[int]:
    """The threads ``hf_tokenizer`` applies its chat template on, in order, from now on."""
    threads: list[int] = []
    encode = hf_tokenizer.apply_chat_template

    def noting_the_thread(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode(*args, **kwargs)

    hf_tokenizer.apply_chat_template = noting_the_thread
    return threads


def test_a_chat_template_over_the_time_limit_is_resource_exhausted(inprocess_server, caplog):
    from services.tokenizer.chat_tokenizer import ChatLimits

    slow, hf_tokenizer = default_tokenizer(ChatLimits(render_timeout_ms=100))
    hf_tokenizer.chat_template = SLOW_CHAT_TEMPLATE

    async def scenario(stub):
        return await outcome(stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=10))

    error = serving(inprocess_server, [slow], scenario)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100 ms limit" in error.details()
    # The warm-up's probe saw the template past its share of the limit: even this short chat went to a
    # worker thread, under the limit, rather than holding up the event loop for seconds.
    assert "the chat template took more than 5 ms" in caplog.text


def test_a_short_chat_is_encoded_in_the_event_loop_and_a_long_one_on_a_worker_thread(inprocess_server):
    from services.tokenizer.servicer import INLINE_CHAT_CHARS

    tokenizer, hf_tokenizer = default_tokenizer()
    threads = noting_threads(hf_tokenizer)
    long = [tokenizer_pb2.Message(role="user", content="lorem ipsum " * (INLINE_CHAT_CHARS // 12 + 1))]

    async def scenario(stub):
        del threads[:]  # the warm-up's
        loop_thread = threading.get_ident()
        short_ids = (await stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=10)).token_ids
        long_ids = (await stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(messages=long), timeout=10)).token_ids
        counted = (await stub.CountChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=10)).count
        return loop_thread, list(short_ids), list(long_ids), counted

    loop_thread, short_ids, long_ids, counted = serving(inprocess_server, [tokenizer], scenario)
    assert threads[0] == loop_thread and threads[2] == loop_thread  # EncodeChat and CountChat, short
    assert threads[1] != loop_thread
    assert counted == len(short_ids) > 0 and len(long_ids) > INLINE_CHAT_CHARS // 12


def test_the_warm_up_probe_keeps_within_tight_chat_limits(inprocess_server, caplog):
    from services.tokenizer.chat_tokenizer import ChatLimits

    tokenizer, hf_tokenizer = default_tokenizer(ChatLimits(max_messages=2, max_message_chars=40))
    threads = noting_threads(hf_tokenizer)

    async def scenario(stub):
        del threads[:]
        await stub.EncodeChat(tokenizer_pb2.EncodeChatRequest(messages=CHAT), timeout=10)
        return threading.get_ident()

    loop_thread = serving(inprocess_server, [tokenizer], scenario)
    assert threads == [loop_thread]
    assert "probe" not in caplog.text
