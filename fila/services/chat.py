"""The chat-completion request as FILA understands it, and the helpers around its wire format.

Only the fields FILA acts on are typed; every other field is forwarded to the upstream as
the client sent it (OpenAI tolerates fields it does not know of, and so do we).
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from fila.domain.errors import InvalidRequest

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    messages: list[Message]
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    conversation_id: str | None = None


MAX_MODEL_LENGTH = 256      # OpenAI's ids, fine-tuned ones included, are far shorter
TOO_DEEP = "the body nests JSON too deeply to be a chat completion request"

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_FILA_ONLY = ("conversation_id",)


# fields that never change the answer: left out of the canonical form (fingerprint, cache key)
NOT_IN_CANONICAL = frozenset({"stream", "stream_options", "user", "metadata"})


class ParsedRequest(msgspec.Struct, kw_only=True):
    raw: dict[str, Any]          # the body as sent, less FILA's own fields
    request: ChatRequest
    model: str
    canonical_bytes: bytes | None = None   # computed once: the ledger's fingerprint and the cache key share it

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.raw["messages"]

    def extra(self) -> dict[str, Any]:
        """Every field but model, messages and stream, for the upstream call."""
        return {k: v for k, v in self.raw.items() if k not in ("model", "messages", "stream")}

    def canonical(self) -> bytes:
        """The request as a stable byte string: sorted keys, the model filled in, and none of the
        fields that do not change the answer (``NOT_IN_CANONICAL``)."""
        if self.canonical_bytes is None:
            body = {k: v for k, v in self.raw.items() if k not in NOT_IN_CANONICAL}
            body["model"] = self.model
            self.canonical_bytes = msgspec.json.encode(body, order="sorted")
        return self.canonical_bytes


def parse_chat_request(body: bytes, default_model: str) -> ParsedRequest:
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object with `messages`", param=None,
                             code="invalid_json")
    try:
        raw = _decode(body)
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest(TOO_DEEP, code="invalid_json") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    if "messages" not in raw:
        raise InvalidRequest("missing required parameter: 'messages'", param="messages",
                             code="missing_required_parameter")
    try:
        request = msgspec.convert(raw, ChatRequest)
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"invalid request: {error}", param=_param_of(error)) from None
    request.stream = bool(request.stream)          # OpenAI reads null as "not given"
    request.n = 1 if request.n is None else request.n
    if not request.messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    for index, message in enumerate(request.messages):
        if message.role not in _ROLES:
            raise InvalidRequest(f"messages[{index}].role must be one of {', '.join(sorted(_ROLES))}",
                                 param=f"messages[{index}].role")
    if request.n < 1 or request.n > 128:
        raise InvalidRequest("'n' must be between 1 and 128", param="n")
    model = request.model if request.model is not None else default_model
    if not model.strip():
        raise InvalidRequest("'model' must not be empty", param="model")
    if len(model) > MAX_MODEL_LENGTH or not model.isprintable():
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_LENGTH} printable characters (no control "
                             "characters)", param="model")
    for name in _FILA_ONLY:
        raw.pop(name, None)
    if request.stream:
        options = dict(raw.get("stream_options") or {})
        options["include_usage"] = True
        raw["stream_options"] = options
    return ParsedRequest(raw=raw, request=request, model=model)


def _param_of(error: msgspec.ValidationError) -> str | None:
    text = str(error)
    marker = "at `$."
    if marker not in text:
        return None
    path = text.split(marker, 1)[1].rstrip("`")
    if "missing required field `" in text:        # name the missing field, not its parent
        path += "." + text.split("missing required field `", 1)[1].split("`", 1)[0]
    return path.split(".")[0] if "[" not in path.split(".")[0] else path


def estimate_tokens(text: str) -> int:
    """A documented approximation (~4 characters a token) for when the upstream gave no usage."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 3
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        total += 4 + estimate_tokens(content or "")
    return total


class StreamAssembler:
    """Rebuilds a ``chat.completion`` from the chunks of a stream (for replays and the cache)."""

    def __init__(self) -> None:
        self.base: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.characters = 0
        self.content_chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        if self.base is None:
            self.base = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            slot = self.choices.setdefault(choice.get("index", 0), {
                "role": "assistant", "content": "", "finish_reason": None, "tool_calls": {}})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                slot["content"] += delta["content"]
                self.characters += len(delta["content"])
                self.content_chunks += 1
            for call in delta.get("tool_calls") or ():
                merged = slot["tool_calls"].setdefault(call.get("index", 0), {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if call.get(key):
                        merged[key] = call[key]
                function = call.get("function") or {}
                if function.get("name"):
                    merged["function"]["name"] = function["name"]
                merged["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]

    def estimated_completion_tokens(self) -> int:
        return max(self.content_chunks, math.ceil(self.characters / 4))

    def completion(self) -> dict[str, Any]:
        base = self.base or {}
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": slot["content"] or None,
                                       "refusal": None}
            if slot["tool_calls"]:
                message["tool_calls"] = [slot["tool_calls"][i] for i in sorted(slot["tool_calls"])]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": slot["finish_reason"]})
        return {"id": base.get("id"), "object": "chat.completion", "created": base.get("created"),
                "model": base.get("model"), "choices": choices, "usage": self.usage,
                "system_fingerprint": base.get("system_fingerprint")}


def completion_as_chunks(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """Serve a stored ``chat.completion`` to a ``stream: true`` client as SSE frames."""
    base = {"id": completion.get("id"), "object": "chat.completion.chunk",
            "created": completion.get("created") or int(time.time()), "model": completion.get("model"),
            "system_fingerprint": completion.get("system_fingerprint")}
    frames = []

    def frame(choices: list, usage: Any = None) -> bytes:
        chunk = dict(base, choices=choices)
        if include_usage:
            chunk["usage"] = usage
        return b"data: " + _encode(chunk) + b"\n\n"

    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        frames.append(frame([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]))
        delta: dict[str, Any] = {}
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
        if delta:
            frames.append(frame([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
        frames.append(frame([{"index": index, "delta": {}, "logprobs": None,
                              "finish_reason": choice.get("finish_reason") or "stop"}]))
    if include_usage:
        frames.append(frame([], completion.get("usage")))
    frames.append(b"data: [DONE]\n\n")
    return frames
