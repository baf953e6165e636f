"""The hot path's msgspec structs (router.schemas.parse) against the pydantic models they stand in for:
whatever a struct accepts, the model accepts with the same values; what it refuses goes to the model."""

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FastChatRequest,
    FastCompletionRequest,
    _FastMessage,
    parse,
)

PAIRS = [(True, FastChatRequest, ChatCompletionRequest), (False, FastCompletionRequest, CompletionRequest)]


def _values(body: Any) -> dict[str, Any]:
    """What the router reads of a request, whichever class holds it."""
    out = {name: getattr(body, name) for name in ChatCompletionRequest.model_fields | CompletionRequest.model_fields
           if hasattr(body, name) and name not in ("messages", "stream_options")}
    out["include_usage"] = bool(body.stream_options and body.stream_options.include_usage)
    if hasattr(body, "messages"):
        out["messages"] = [m.as_template_dict() for m in body.messages]
    out["num_logprobs"], out["output_limit"] = body.num_logprobs(), body.output_limit()
    return out


@pytest.mark.parametrize(("chat", "fast", "model"), PAIRS)
def test_structs_have_the_models_fields_and_defaults(chat, fast, model):
    fields = {f.name: f for f in msgspec.structs.fields(fast)}
    assert set(fields) == set(model.model_fields)
    for name, info in model.model_fields.items():
        if info.is_required():
            assert fields[name].required, name
            continue
        default = info.get_default(call_default_factory=True)
        got = fields[name].default
        assert got == default or (name == "stop" and got is None and default == []), name


def test_a_message_struct_has_the_models_fields():
    assert set(_FastMessage.__struct_fields__) == {"role", "content"}


def test_a_plain_request_takes_the_fast_path():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "stop": "x", "temperature": 0}
    got = parse(True, json.dumps(body).encode())
    assert isinstance(got, FastChatRequest)
    assert _values(got) == _values(ChatCompletionRequest.model_validate(body))
    assert isinstance(parse(False, b'{"model": "m", "prompt": [1, 2]}'), FastCompletionRequest)


def test_what_the_structs_do_not_model_goes_to_the_model():
    extra = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    got = parse(True, json.dumps(extra).encode())
    assert isinstance(got, ChatCompletionRequest)
    assert got.messages[0].as_template_dict()["name"] == "bob"  # the chat template sees it
    lax = parse(True, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.0}')
    assert isinstance(lax, ChatCompletionRequest) and lax.max_tokens == 5


@pytest.mark.parametrize("body", [
    b'{"model": "m", "messages": []}', b'{"model": "m", "messages": [{"role": "bot", "content": "x"}]}',
    b'{"model": "m", "messages": [{"role": "user"}], "top_logprobs": 2}', b'{"model": "m", "prompt": ""}',
    b'{"model": "m", "prompt": "x", "echo": true, "logprobs": 6}', b'{"model": "m", "prompt": "x", "stop": ["a", ""]}',
    b'{"model": "m", "prompt": "x", "temperature": 2.5}', b'[1]', b'{"model": "m", "prompt": "x"',
])
def test_invalid_bodies_raise_the_models_error(body):
    chat = b"messages" in body
    with pytest.raises(ValidationError):
        parse(chat, body)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(-3, 3, allow_nan=False),
                 st.text(max_size=3), st.lists(st.integers(-1, 5), max_size=3))


def _mostly(valid: st.SearchStrategy, *other: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` nine times in ten, else one of `other` (a plain one_of would draw each branch alike)."""
    return st.integers(0, 9).flatmap(lambda k: valid if k else st.one_of(*other))


def _near(lo: float, hi: float, ints: bool = False) -> st.SearchStrategy:
    """Mostly values in [lo, hi]; else its bounds, values just out of it, huge ints, floats for ints, anything."""
    inside = st.integers(int(lo), int(hi)) if ints else st.floats(lo, hi, allow_nan=False)
    out = st.integers(int(lo) - 1, int(hi) + 1) if ints else st.floats(lo - 0.5, hi + 0.5, allow_nan=False)
    return _mostly(inside, st.sampled_from([lo, hi]), out, _ANY, st.integers(2**62, 2**66), st.just(1.0))


_CONTENT = _mostly(st.text(max_size=5), st.none(), st.integers(),
                     st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"])},
                                                    optional={"text": st.text(max_size=3)}), max_size=2))
_ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot"])
_MESSAGE = _mostly(st.fixed_dictionaries({"role": _ROLES, "content": _CONTENT}),
                     st.fixed_dictionaries({"role": _ROLES}, optional={"content": _CONTENT, "name": st.text(max_size=3)}),
                     _ANY)
_BOOL = _mostly(st.booleans(), _ANY)
_SAMPLING = {"max_tokens": _near(1, 5, True), "temperature": _near(0, 2), "top_p": _near(0, 1), "top_k": _near(0, 3, True),
             "min_p": _near(0, 1), "n": _near(1, 16, True), "seed": _near(0, 9, True),
             "presence_penalty": _near(-2, 2), "frequency_penalty": _near(-2, 2), "repetition_penalty": _near(0, 2),
             "stream": _BOOL, "ignore_eos": _BOOL, "user": _mostly(st.text(max_size=3), _ANY),
             "extra_field": _ANY,
             "stop": _mostly(st.one_of(st.text(max_size=2), st.lists(st.text(max_size=2), max_size=5)), _ANY),
             "stream_options": _mostly(st.fixed_dictionaries({}, optional={"include_usage": _BOOL}), _ANY)}
_MODEL = _mostly(st.just("m"), st.just(1))
_CHAT = st.fixed_dictionaries({"model": _MODEL, "messages": _mostly(st.lists(_MESSAGE, max_size=3), _ANY)},
                              optional={**_SAMPLING, "max_completion_tokens": _near(1, 5, True), "logprobs": _BOOL,
                                        "top_logprobs": _near(0, 20, True)})
_COMPLETION = st.fixed_dictionaries(
    {"model": _MODEL, "prompt": _mostly(st.one_of(st.text(max_size=4), st.lists(st.integers(-2, 9), max_size=3)), _ANY)},
    optional={**_SAMPLING, "logprobs": _near(0, 5, True), "echo": _BOOL})


def _check_agrees(chat: bool, body: dict) -> bool:
    """True where the struct took the body (and agreed with the model)."""
    raw = json.dumps(body).encode()
    fast, model = (FastChatRequest, ChatCompletionRequest) if chat else (FastCompletionRequest, CompletionRequest)
    try:
        quick = msgspec.json.decode(raw, type=fast)
    except msgspec.MsgspecError:
        return False  # the model decides (tested by the error cases above)
    try:
        full = model.model_validate_json(raw)
    except ValidationError as e:
        raise AssertionError(f"the struct accepts what the model refuses: {body} ({e})") from None
    try:
        expected = _values(full)
    except ValueError:  # e.g. a non-text content part: the router refuses it later, from either class
        with pytest.raises(ValueError):
            _values(quick)
        return True
    assert _values(quick) == expected, body
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(_CHAT)
def test_a_chat_body_the_struct_accepts_means_the_same_to_the_model(body):
    _check_agrees(True, body)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(_COMPLETION)
def test_a_completion_body_the_struct_accepts_means_the_same_to_the_model(body):
    _check_agrees(False, body)


def _fast_path_count(strategy: st.SearchStrategy, chat: bool) -> int:
    """How many of 200 bodies drawn the way the tests above draw them take the struct (the fast path)."""
    taken = [0]

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(body):
        taken[0] += _check_agrees(chat, body)

    draw()
    return taken[0]


def test_the_generated_bodies_reach_the_struct():
    """The two tests above check something: a good share of their bodies take the fast path (drawn here, so
    that this test stands alone)."""
    assert _fast_path_count(_CHAT, True) >= 30 and _fast_path_count(_COMPLETION, False) >= 30
