"""Deterministic text, token and wire-shape logic for the fake OpenAI upstream.

Nothing here touches the network: the request Structs the fake decodes, an approximate
tokenizer, a reply generator that turns a hash of the request into a short sentence, and the
chat.completion / chat.completion.chunk objects built from it.
The same (model, messages, temperature, top_p, seed, choice index) always gives the same
words; `max_tokens` only truncates them, so a truncated reply is a prefix of the full one,
and `stream` does not change them, so a reassembled stream equals the non-stream content.
One word counts as one completion token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

KNOWN_MODELS: tuple[str, ...] = ("gpt-4.1-nano", "gpt-4.1-mini", "gpt-4o-mini", "gpt-4o")
FAKE_PREFIX = "fake-"
LISTED_MODELS: tuple[str, ...] = (*KNOWN_MODELS, "fake-model")
WORDS_PER_CHUNK = 3
FINGERPRINT = "fp_fa4e0000"

_WORDS: tuple[str, ...] = (
    "amber", "beacon", "candid", "delta", "ember", "fable", "garnet", "harbor",
    "ivory", "jasper", "kindle", "lumen", "meadow", "nimbus", "onyx", "pebble",
    "quartz", "ripple", "saffron", "timber", "umber", "velvet", "willow", "xenon",
    "yonder", "zephyr", "anchor", "breeze", "cobalt", "dune", "echo", "fjord",
    "glacier", "hollow", "island", "jungle", "kestrel", "lagoon", "marble", "nectar",
    "orchid", "prairie", "quill", "raven", "summit", "tundra", "upland", "valley",
    "walnut", "yarrow", "zenith", "aurora", "bramble", "cinder", "drift", "eclipse",
    "falcon", "grove", "heron", "inlet", "juniper", "kelp", "lantern", "mosaic",
)  # fmt: skip
_ECHO_WORDS = 6
_MODEL_CREATED = 1_700_000_000

# What OpenAI says (message, type, code) with a status the fake is told to force.
STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request (forced by the fake upstream).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests. Please try again in 1s.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """The part of OpenAI's chat request the fake reads; other fields are tolerated."""

    model: str
    messages: list[Message]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = 1
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


Invalid = tuple[str, str | None, str | None]  # OpenAI error (message, param, code)


def parse_chat(decode: Callable[[bytes], ChatRequest], body: bytes) -> ChatRequest | Invalid:
    """The decoded request, or what OpenAI would say is wrong with it (a 400)."""
    try:
        req = decode(body)
    except msgspec.ValidationError as exc:
        return _invalid(str(exc))
    except msgspec.DecodeError:
        return "We could not parse the JSON body of your request.", None, None
    if not req.messages:
        return "Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages", "empty_array"
    if req.n is None:
        req.n = 1
    return req


def _invalid(text: str) -> Invalid:
    """msgspec's error text ("... - at `$.messages[0]`") in OpenAI's terms."""
    at = re.search(r"at `\$\.?([^`]*)`", text)
    param = at.group(1) if at else None
    missing = re.search(r"missing required field `([^`]+)`", text)
    if missing:
        name = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
    return f"Invalid value for '{param}': {text}", param, "invalid_value"


def model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}


def is_known_model(model: str) -> bool:
    return model in KNOWN_MODELS or model.startswith(FAKE_PREFIX)


def message_text(message: Message) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def approx_tokens(text: str) -> int:
    """About four characters per token, rounded up (OpenAI's own rule of thumb)."""
    return -(-len(text) // 4)


def prompt_tokens(messages: list[Message]) -> int:
    """4 tokens of framing per message plus its text, and 3 to prime the reply."""
    return sum(4 + approx_tokens(message_text(m)) for m in messages) + 3


def reply_seed(req: ChatRequest) -> bytes:
    """The bytes every choice of this request hashes from (never includes stream or max_tokens)."""
    return msgspec.json.encode((req.model, req.messages, req.temperature, req.top_p, req.seed))


def reply_words(seed: bytes, index: int, messages: list[Message]) -> list[str]:
    """Choice `index`'s full reply, one word per token: a few hashed words, then an echo."""
    digest = hashlib.sha256(seed + index.to_bytes(4, "little")).digest()
    count = 5 + digest[0] % 8
    words = [_WORDS[b % len(_WORDS)] for b in digest[1 : 1 + count]]
    words[0] = words[0].capitalize()
    words[-1] += "."
    last_user = next((m for m in reversed(messages) if m.role == "user"), None)
    echoed = message_text(last_user).split()[:_ECHO_WORDS] if last_user else []
    if echoed:
        echoed[0] = '"' + echoed[0]
        echoed[-1] += '".'
        words += ["You", "said:", *echoed]
    return words


def completion_limit(req: ChatRequest) -> int | None:
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def truncate(words: list[str], limit: int | None) -> tuple[list[str], str]:
    """The words actually sent and the finish_reason."""
    if limit is not None and limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def stream_pieces(words: list[str]) -> list[str]:
    """Content deltas of a few words each; concatenated they equal " ".join(words)."""
    pieces = []
    for start in range(0, len(words), WORDS_PER_CHUNK):
        piece = " ".join(words[start : start + WORDS_PER_CHUNK])
        pieces.append(piece if start == 0 else " " + piece)
    return pieces


Choice = tuple[list[str], str]  # the words sent, finish_reason


def answer(req: ChatRequest) -> tuple[list[Choice], dict[str, Any]]:
    """Every choice's words and finish_reason, and the usage they add up to."""
    limit = completion_limit(req)
    seed = reply_seed(req)
    choices = [truncate(reply_words(seed, i, req.messages), limit) for i in range(req.n or 1)]
    prompt = prompt_tokens(req.messages)
    completion = sum(len(words) for words, _ in choices)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    return choices, usage


def completion(head: dict[str, Any], choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion object; head holds id, created and model."""
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": " ".join(words), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (words, finish) in enumerate(choices)
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


def chunks(
    head: dict[str, Any], choices: list[Choice], usage: dict[str, Any], options: StreamOptions | None
) -> list[dict[str, Any]]:
    """The chat.completion.chunk objects of a stream, choice after choice, then the usage chunk."""
    include_usage = options is not None and options.include_usage
    base = {**head, "object": "chat.completion.chunk", "service_tier": "default", "system_fingerprint": FINGERPRINT}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    out = []
    for i, (words, finish) in enumerate(choices):
        out.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
        out.extend(chunk(i, {"content": piece}) for piece in stream_pieces(words))
        out.append(chunk(i, {}, finish))
    if include_usage:
        out.append({**base, "choices": [], "usage": usage})
    return out
