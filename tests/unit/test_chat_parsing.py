"""parse_chat_request: what FILA accepts, what it refuses (naming the field), and what it forwards."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from fila.domain.errors import InvalidRequest
from fila.services.chat import parse_chat_request

DEFAULT = "gpt-4.1-nano"
USER = [{"role": "user", "content": "hello"}]


def parse(body: Any):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_chat_request(raw, DEFAULT)


def refusal(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(body)
    assert raised.value.status == 400 and raised.value.type == "invalid_request_error"
    return raised.value


def test_a_minimal_request_gets_the_default_model():
    parsed = parse({"messages": USER})
    assert parsed.model == DEFAULT
    assert parsed.messages == USER
    assert parsed.request.stream is False and parsed.request.n == 1


def test_an_explicit_model_wins_over_the_default():
    assert parse({"model": "gpt-4o", "messages": USER}).model == "gpt-4o"


def test_fields_fila_does_not_know_are_forwarded_untouched():
    body = {"model": "gpt-4o", "messages": USER, "temperature": 0.2, "tools": [{"type": "function"}],
            "response_format": {"type": "json_object"}, "max_tokens": 5, "future_field": {"x": [1]}}
    extra = parse(body).extra()
    assert extra == {"temperature": 0.2, "tools": [{"type": "function"}], "response_format": {"type": "json_object"},
                     "max_tokens": 5, "future_field": {"x": [1]}}


def test_missing_messages_is_named():
    error = refusal({"model": "gpt-4o"})
    assert error.param == "messages" and "messages" in error.message


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "hello"}, "messages"),
    ({"messages": USER, "model": 5}, "model"),
    ({"messages": USER, "n": "2"}, "n"),
    ({"messages": USER, "n": 1.5}, "n"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": [{"role": 5, "content": "x"}]}, "messages[0].role"),
    ({"messages": [*USER, {"role": "user", "content": 5}]}, "messages[1].content"),
    ({"messages": [*USER, "hello"]}, "messages[1]"),
])
def test_a_field_of_the_wrong_type_is_named_in_param(body, param):
    assert refusal(body).param == param


def test_a_wrong_type_inside_stream_options_names_stream_options():
    assert refusal({"messages": USER, "stream_options": {"include_usage": "yes"}}).param.startswith("stream_options")


def test_a_message_without_a_role_names_the_role():
    # the field that is missing, as OpenAI names it, not the message that holds it
    assert refusal({"messages": [{"content": "hello"}]}).param == "messages[0].role"


def test_empty_messages_are_refused():
    assert refusal({"messages": []}).param == "messages"


@pytest.mark.parametrize("role", ["wizard", "", "USER"])
def test_an_unknown_role_is_refused_with_its_index(role):
    error = refusal({"messages": [*USER, {"role": role, "content": "x"}]})
    assert error.param == "messages[1].role"


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_the_openai_roles_are_accepted(role):
    assert parse({"messages": [{"role": role, "content": "x"}]}).messages[0]["role"] == role


@pytest.mark.parametrize("n", [0, -1, 129])
def test_n_out_of_range_is_refused(n):
    assert refusal({"messages": USER, "n": n}).param == "n"


@pytest.mark.parametrize("n", [1, 128])
def test_n_at_the_bounds_is_accepted(n):
    assert parse({"messages": USER, "n": n}).request.n == n


@pytest.mark.parametrize("model", ["gpt-4.1-nano\x00x", "gpt\n4", "a" * 257])
def test_a_model_with_control_characters_or_over_256_characters_is_refused(model):
    assert refusal({"model": model, "messages": USER}).param == "model"


def test_a_fine_tuned_model_name_is_accepted():
    model = "ft:gpt-4.1-nano-2025-04-14:my-org:custom suffix:AbC123xy"
    assert parse({"model": model, "messages": USER}).model == model
    assert parse({"model": "m" * 256, "messages": USER}).model == "m" * 256


def test_json_nested_deeper_than_the_decoder_goes_is_a_400_not_a_crash():
    deep = b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001
    assert refusal(deep).code == "invalid_json"
    assert refusal(b"[" * 100_000 + b"]" * 100_000).code == "invalid_json"


def test_an_empty_model_is_refused():
    assert refusal({"messages": USER, "model": "  "}).param == "model"


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b"null", b'"messages"'])
def test_a_body_that_is_not_a_json_object_is_refused(body):
    error = refusal(body)
    assert error.code == "invalid_json"


def test_null_optional_fields_are_tolerated_as_openai_does():
    # the openai SDK sends `"n": null, "stream": null` when a caller passes None explicitly
    parsed = parse({"model": None, "messages": USER, "n": None, "stream": None, "stream_options": None})
    assert parsed.model == DEFAULT
    assert not parsed.request.stream
    assert parsed.request.n in (None, 1)


def test_conversation_id_is_fila_s_own_and_never_forwarded():
    parsed = parse({"model": "gpt-4o", "messages": USER, "conversation_id": "conv-1", "temperature": 0})
    assert parsed.request.conversation_id == "conv-1"
    assert "conversation_id" not in parsed.raw and "conversation_id" not in parsed.extra()
    assert b"conv-1" not in parsed.canonical()


def test_a_stream_always_asks_the_upstream_for_usage_but_remembers_what_the_client_asked():
    parsed = parse({"messages": USER, "stream": True})
    assert parsed.extra()["stream_options"] == {"include_usage": True}
    assert parsed.request.stream_options is None  # the client did not ask: no usage chunk for it

    asked = parse({"messages": USER, "stream": True, "stream_options": {"include_usage": True}})
    assert asked.extra()["stream_options"] == {"include_usage": True}
    assert asked.request.stream_options.include_usage is True

    declined = parse({"messages": USER, "stream": True,
                      "stream_options": {"include_usage": False, "include_obfuscation": False}})
    assert declined.extra()["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert declined.request.stream_options.include_usage is False


def test_a_plain_request_is_forwarded_without_stream_options():
    parsed = parse({"messages": USER})
    assert "stream_options" not in parsed.extra() and "stream" not in parsed.extra()


def test_the_canonical_form_ignores_key_order_stream_flags_and_the_default_model():
    a = parse({"messages": USER, "temperature": 0, "model": DEFAULT})
    b = parse(b'{"temperature": 0, "messages": [{"role": "user", "content": "hello"}], "stream": true}')
    c = parse({"messages": USER, "temperature": 1})
    assert a.canonical() == b.canonical() != c.canonical()
    assert msgspec.json.decode(a.canonical())["model"] == DEFAULT
