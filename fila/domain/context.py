"""A client's base context, its conversation history rules, and the cache's management actions.

**Base context.** One ``BaseContext`` per API key (id ``uuid5`` of the key id, so two "first"
definitions collide in the store): ``{"system": "...", "reference": "..."}``, both optional
strings, at least one non-empty. It is prepended to every request of that key as up to two
``system`` messages, ``system`` first, then ``reference``, before the client's own messages.
It applies for the plan's ``cache_ttls["context"]`` seconds (30 days by default) after it was
last set; the client sets it again to keep it. Being events, it survives losing Redis.

**Conversation history.** What FILA prepends to a request that names a ``conversation_id``:
the client's earlier messages and FILA's answers, at most ``MAX_HISTORY_MESSAGES`` messages and
``MAX_HISTORY_CHARS`` characters of text. Older whole turns are dropped first (a turn starts at
a ``user`` message and runs to the next one), so the history never starts mid-turn.

**Cache actions.** Each management action (an admin purge of a client's cache, an admin
deletion of one cached response, a client deleting one of its conversations) is one
``CacheAction`` aggregate with one event, so the log says who dropped what and when.
"""

from __future__ import annotations

import re
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from fila.domain.errors import InvalidRequest, NotFound

CONTEXT_NAMESPACE = uuid5(NAMESPACE_URL, "https://fila.dev/base-context")

MAX_SYSTEM_CHARS = 16_000
MAX_REFERENCE_CHARS = 48_000
MAX_HISTORY_MESSAGES = 50
MAX_HISTORY_CHARS = 32_000
_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

CONTEXT_TOPICS = ("fila:BaseContext.Defined", "fila:BaseContext.Replaced", "fila:BaseContext.Cleared")
PURGED_TOPIC = "fila:CacheAction.Purged"
ENTRY_DELETED_TOPIC = "fila:CacheAction.EntryDeleted"
CONVERSATION_DELETED_TOPIC = "fila:CacheAction.ConversationDeleted"


def context_id_for(api_key_id: str) -> UUID:
    return uuid5(CONTEXT_NAMESPACE, api_key_id)


def validate_context(system: Any, reference: Any) -> tuple[str | None, str | None]:
    """Check a base context; a bad one is an InvalidRequest naming the field."""
    for name, value, limit in (("system", system, MAX_SYSTEM_CHARS), ("reference", reference, MAX_REFERENCE_CHARS)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{name}' must be a string or null", param=name)
        if value is not None and len(value) > limit:
            raise InvalidRequest(f"'{name}' must be at most {limit} characters", param=name)
    system = system or None
    reference = reference or None
    if system is None and reference is None:
        raise InvalidRequest("send at least one of 'system' and 'reference' (non-empty); "
                             "DELETE /v1/fila/context removes the context", param="system")
    return system, reference


def context_messages(system: str | None, reference: str | None) -> list[dict[str, str]]:
    """The messages a base context prepends to a request."""
    return [{"role": "system", "content": text} for text in (system, reference) if text]


def validate_conversation_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str) or not _CONVERSATION_ID.match(conversation_id):
        raise InvalidRequest("'conversation_id' must be 1-128 characters of letters, digits, '-', '_', '.' or ':'",
                             param="conversation_id")
    return conversation_id


def _chars(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


def truncate_history(messages: list[dict[str, Any]], max_messages: int = MAX_HISTORY_MESSAGES,
                     max_chars: int = MAX_HISTORY_CHARS) -> list[dict[str, Any]]:
    """The newest whole turns that fit in ``max_messages`` and ``max_chars`` (oldest dropped first)."""
    turns: list[list[dict[str, Any]]] = []
    for message in messages:
        if message.get("role") == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    if turns and turns[0][0].get("role") != "user":
        turns.pop(0)    # the oldest messages were trimmed mid-turn: drop the rest of that turn
    kept: list[list[dict[str, Any]]] = []
    count = chars = 0
    for turn in reversed(turns):
        size = sum(_chars(m) for m in turn)
        if count + len(turn) > max_messages or chars + size > max_chars:
            break
        kept.append(turn)
        count += len(turn)
        chars += size
    return [message for turn in reversed(kept) for message in turn]


class BaseContext(Aggregate):
    TOPIC = "fila:BaseContext"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:BaseContext.Created"

    @event("Defined", topic="fila:BaseContext.Defined")
    def __init__(self, id: UUID, api_key_id: str, system: str | None, reference: str | None, at: str) -> None:
        self.api_key_id = api_key_id
        self.system = system
        self.reference = reference
        self.set_at: str | None = at

    @classmethod
    def define(cls, api_key_id: str, system: Any, reference: Any, at: str) -> BaseContext:
        system, reference = validate_context(system, reference)
        return cls(id=context_id_for(api_key_id), api_key_id=api_key_id, system=system, reference=reference, at=at)

    @property
    def is_set(self) -> bool:
        return self.set_at is not None

    def replace(self, system: Any, reference: Any, at: str) -> None:
        system, reference = validate_context(system, reference)
        self._replaced(system=system, reference=reference, at=at)

    @event("Replaced", topic="fila:BaseContext.Replaced")
    def _replaced(self, system: str | None, reference: str | None, at: str) -> None:
        self.system = system
        self.reference = reference
        self.set_at = at

    def clear(self, at: str) -> None:
        if not self.is_set:
            raise NotFound("this API key has no base context", code="context_not_found")
        self._cleared(at=at)

    @event("Cleared", topic="fila:BaseContext.Cleared")
    def _cleared(self, at: str) -> None:
        self.system = None
        self.reference = None
        self.set_at = None


class CacheAction(Aggregate):
    """One management action on the cache; each kind is its own creation event."""

    TOPIC = "fila:CacheAction"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:CacheAction.Created"

    class Purged(Created):
        TOPIC = PURGED_TOPIC
        api_key_id: str
        by: str
        at: str

    class EntryDeleted(Created):
        TOPIC = ENTRY_DELETED_TOPIC
        api_key_id: str
        cache_key: str
        by: str
        at: str

    class ConversationDeleted(Created):
        TOPIC = CONVERSATION_DELETED_TOPIC
        api_key_id: str
        conversation_id: str
        by: str
        at: str

    def __init__(self, api_key_id: str, by: str, at: str, cache_key: str | None = None,
                 conversation_id: str | None = None) -> None:
        self.api_key_id = api_key_id
        self.by = by
        self.at = at
        self.cache_key = cache_key
        self.conversation_id = conversation_id

    @classmethod
    def purge(cls, action_id: UUID, api_key_id: str, by: str, at: str) -> CacheAction:
        return cls._create(cls.Purged, id=action_id, api_key_id=api_key_id, by=by, at=at)

    @classmethod
    def delete_entry(cls, action_id: UUID, api_key_id: str, cache_key: str, by: str, at: str) -> CacheAction:
        return cls._create(cls.EntryDeleted, id=action_id, api_key_id=api_key_id, cache_key=cache_key, by=by,
                           at=at)

    @classmethod
    def delete_conversation(cls, action_id: UUID, api_key_id: str, conversation_id: str, by: str,
                            at: str) -> CacheAction:
        return cls._create(cls.ConversationDeleted, id=action_id, api_key_id=api_key_id,
                           conversation_id=conversation_id, by=by, at=at)
