"""The prompt cache key: stable for equal requests, different for any change that matters."""
import hashlib
import struct
from dataclasses import replace

import pytest
from redis.crc import key_slot

from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling
from promptcache import keys
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt, tenant_tag

PREFIX = "nlpmesh:pc"


def float32(value: float) -> float:
    """What a protobuf float field gives back for ``value``."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def template_key(**changes) -> PromptCacheKey:
    key = PromptCacheKey(
        tenant="acme",
        model="SmolLM2-135M-Instruct",
        revision="r1",
        prompt=TemplatePrompt("summarise", "2", {"text": "hello", "words": 20}),
        sampling=Sampling(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=("\n",)),
    )
    return replace(key, **changes)


def chat_key(messages=(("system", "be brief"), ("user", "hi"))) -> PromptCacheKey:
    return template_key(prompt=ChatPrompt(messages))


def test_same_inputs_give_the_same_key():
    assert template_key().redis_key(PREFIX) == template_key().redis_key(PREFIX)
    assert chat_key().redis_key(PREFIX) == chat_key().redis_key(PREFIX)


def test_key_layout_is_prefix_tenant_namespace_and_digest():
    key = template_key()
    tag = tenant_tag("acme")
    template = hashlib.sha256(key.prompt.id.encode()).hexdigest()[:16]
    # A template's answers carry the tenant + template hash tag (one Redis Cluster slot with their index).
    assert key.redis_key(PREFIX) == f"{PREFIX}:t:{tag}:{{{tag}:tpl:{template}}}:e:{key.digest()}"
    assert len(key.digest()) == 64
    chat = chat_key()
    assert chat.redis_key(PREFIX) == f"{PREFIX}:t:{tag}:e:{chat.digest()}"  # alone in its operations: no tag


def test_hash_tags_spread_tenants_and_templates_but_keep_a_template_with_its_index():
    tag = tenant_tag("acme")
    entry = template_key().redis_key(PREFIX)
    assert key_slot(entry.encode()) == key_slot(keys.template_index(PREFIX, tag, template_key().prompt.id).encode())
    slots = {key_slot(template_key(tenant=t, prompt=TemplatePrompt(i, "1", {})).redis_key(PREFIX).encode())
             for t in ("acme", "globex", "initech") for i in ("summarise", "translate", "classify")}
    assert len(slots) == 9  # no single tag for everything


def test_a_prefix_with_a_brace_is_refused():
    with pytest.raises(ValueError, match="may not hold"):
        keys.check_prefix("nlpmesh:{pc}")


@pytest.mark.parametrize(
    "changes",
    [
        {"tenant": "globex"},
        {"model": "other-model"},
        {"revision": "r2"},
        {"prompt": TemplatePrompt("translate", "2", {"text": "hello", "words": 20})},
        {"prompt": TemplatePrompt("summarise", "3", {"text": "hello", "words": 20})},
        {"prompt": TemplatePrompt("summarise", "2", {"text": "hello!", "words": 20})},
        {"prompt": TemplatePrompt("summarise", "2", {"text": "hello", "words": 21})},
        {"prompt": TemplatePrompt("summarise", "2", {"text": "hello"})},
        {"prompt": TemplatePrompt("summarise", "2", {"text": "hello", "words": 20, "tone": "dry"})},
        {"prompt": ChatPrompt((("user", "hello"),))},
    ],
)
def test_each_key_field_changes_the_key(changes):
    assert template_key(**changes).redis_key(PREFIX) != template_key().redis_key(PREFIX)


@pytest.mark.parametrize(
    "messages",
    [
        (("system", "be brief"), ("user", "hi!")),
        (("system", "be brief"), ("assistant", "hi")),
        (("system", "be brief!"), ("user", "hi")),
        (("user", "hi"), ("system", "be brief")),
        (("system", "be brief"),),
        (("system", "be brief"), ("user", "hi"), ("user", "")),
    ],
)
def test_each_chat_message_changes_the_key(messages):
    assert chat_key(messages).digest() != chat_key().digest()


@pytest.mark.parametrize(
    "changes",
    [
        {"max_new_tokens": 65},
        {"temperature": 0.8},
        {"top_p": 0.95},
        {"top_k": 41},
        {"seed": 8},
        {"seed": None},
        {"stop": ("\n", "END")},
        {"stop": ()},
        {"repetition_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": -0.5},
    ],
)
def test_each_sampling_field_changes_a_sampled_key(changes):
    sampling = replace(template_key().sampling, **changes)
    assert template_key(sampling=sampling).digest() != template_key().digest()


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.2}, {"presence_penalty": 0.5},
                                     {"frequency_penalty": 1.0}])
def test_a_penalty_changes_a_greedy_key_and_one_left_off_keeps_the_key_it_had(penalty):
    greedy = Sampling(max_new_tokens=64, stop=("\n",))
    assert template_key(sampling=replace(greedy, **penalty)).digest() != template_key(sampling=greedy).digest()
    off = replace(greedy, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    assert template_key(sampling=off).digest() == template_key(sampling=greedy).digest()


def test_stop_order_matters():
    one = template_key(sampling=replace(template_key().sampling, stop=("a", "b")))
    other = template_key(sampling=replace(template_key().sampling, stop=("b", "a")))
    assert one.digest() != other.digest()


def test_variable_order_does_not_matter():
    forward = TemplatePrompt("t", "1", {"a": 1, "b": {"x": 1, "y": [1, 2]}})
    backward = TemplatePrompt("t", "1", {"b": {"y": [1, 2], "x": 1}, "a": 1})
    assert template_key(prompt=forward).digest() == template_key(prompt=backward).digest()


def test_whole_number_variables_match_their_struct_float_form():
    as_int = TemplatePrompt("t", "1", {"n": 3, "items": [1, 2]})
    as_struct = TemplatePrompt("t", "1", {"n": 3.0, "items": [1.0, 2.0]})
    assert template_key(prompt=as_int).digest() == template_key(prompt=as_struct).digest()
    fraction = TemplatePrompt("t", "1", {"n": 3.5, "items": [1, 2]})
    assert template_key(prompt=fraction).digest() != template_key(prompt=as_int).digest()


def test_two_tenants_get_different_keys_without_the_raw_tenant():
    tenant_a = "sk-live-alice-0123456789"
    tenant_b = "sk-live-bob-9876543210"
    key_a = template_key(tenant=tenant_a).redis_key(PREFIX)
    key_b = template_key(tenant=tenant_b).redis_key(PREFIX)
    assert key_a != key_b
    # The tenant is in the hash too, not only in the namespace.
    assert template_key(tenant=tenant_a).digest() != template_key(tenant=tenant_b).digest()
    assert key_a.split(":e:")[0] != key_b.split(":e:")[0]  # separate namespaces
    for key, tenant in ((key_a, tenant_a), (key_b, tenant_b)):
        assert tenant not in key and "alice" not in key and "bob" not in key


def test_greedy_key_ignores_seed_top_p_and_top_k():
    greedy = Sampling(max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=("\n",))
    noisy = Sampling(max_new_tokens=64, temperature=0.0, top_p=0.5, top_k=5, seed=123, stop=("\n",))
    assert template_key(sampling=greedy).digest() == template_key(sampling=noisy).digest()
    longer = replace(greedy, max_new_tokens=65)
    assert template_key(sampling=longer).digest() != template_key(sampling=greedy).digest()


def test_float32_values_from_protobuf_match_python_floats():
    as_python = Sampling(max_new_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=7)
    as_float32 = replace(as_python, temperature=float32(0.7), top_p=float32(0.9))
    assert as_float32.temperature != 0.7  # the float32 round trip really is lossy
    assert template_key(sampling=as_python).digest() == template_key(sampling=as_float32).digest()


def test_float32_rounding_is_stable_for_many_values():
    for hundredths in range(1, 201):
        exact = hundredths / 100
        lossy = float32(exact)
        one = template_key(sampling=replace(template_key().sampling, temperature=exact))
        other = template_key(sampling=replace(template_key().sampling, temperature=lossy))
        assert one.digest() == other.digest(), exact


def test_determinism_is_greedy_or_seeded():
    assert Sampling(temperature=0.0).deterministic
    assert Sampling(temperature=0.8, seed=1).deterministic
    assert not Sampling(temperature=0.8).deterministic


def test_a_response_format_changes_the_key_and_a_schema_spacing_does_not():
    greedy = Sampling(max_new_tokens=64)

    def digest(response_format):
        return template_key(sampling=replace(greedy, response_format=response_format)).digest()
    schema = ResponseFormat("json_schema", '{"type": "object", "required": ["a"]}')
    respaced = ResponseFormat("json_schema", '{"required":["a"],"type":"object"}')
    other = ResponseFormat("json_schema", '{"type": "object", "required": ["b"]}')
    digests = {digest(None), digest(schema), digest(other), digest(ResponseFormat("regex", "a+")),
               digest(ResponseFormat("choice", ("a", "b"))), digest(ResponseFormat("choice", ("b", "a")))}
    assert len(digests) == 6
    assert digest(respaced) == digest(schema)
