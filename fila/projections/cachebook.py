"""The cache's control events in memory, for the hot path (fed by the Registry): every client's
base context, purge generations, and the evictions a purge or deletion asks of this process."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fila.domain import context as domain
from fila.domain.time import iso, parse_iso


@dataclass(slots=True)
class ContextRecord:
    api_key_id: str
    system: str | None
    reference: str | None
    set_at: str
    set_at_s: float
    messages: list
    version: int

    def to_public(self, ttl_s: int) -> dict[str, Any]:
        expires = datetime.fromtimestamp(self.set_at_s + ttl_s, UTC)
        return {"object": "fila.context", "system": self.system, "reference": self.reference,
                "set_at": self.set_at, "expires_at": iso(expires)}


class CacheBook:
    """What every process must know of the cache's control events: base contexts and purges.

    Fed by the Registry (on its reader thread): handlers only assign dict items and queue
    evictions, which the event loop applies before its next lookup.
    """

    def __init__(self) -> None:
        self.contexts: dict[str, ContextRecord] = {}
        self.context_owner: dict[str, str] = {}        # context aggregate id -> api key id
        self.context_version: dict[str, int] = {}      # api key id -> aggregate version
        self.generations: dict[str, int] = {}          # api key id -> purges so far
        self.pending: deque[tuple[str, str]] = deque()  # ("key" | "prefix", what) evictions

    def attach(self, registry: Any) -> CacheBook:
        registry.register("fila:BaseContext.Defined", self._context_set)
        registry.register("fila:BaseContext.Replaced", self._context_set)
        registry.register("fila:BaseContext.Cleared", self._context_cleared)
        registry.register(domain.PURGED_TOPIC, self._purged)
        registry.register(domain.ENTRY_DELETED_TOPIC, self._entry_deleted)
        registry.register(domain.CONVERSATION_DELETED_TOPIC, self._conversation_deleted)
        return self

    def _context_set(self, context_id: str, state: dict[str, Any], version: int) -> None:
        api_key_id = state.get("api_key_id") or self.context_owner[context_id]
        self.context_owner[context_id] = api_key_id
        self.context_version[api_key_id] = version
        self.contexts[api_key_id] = ContextRecord(
            api_key_id=api_key_id, system=state["system"], reference=state["reference"], set_at=state["at"],
            set_at_s=parse_iso(state["at"]).timestamp(),
            messages=domain.context_messages(state["system"], state["reference"]), version=version)

    def _context_cleared(self, context_id: str, state: dict[str, Any], version: int) -> None:
        api_key_id = self.context_owner[context_id]
        self.context_version[api_key_id] = version
        self.contexts.pop(api_key_id, None)

    def _purged(self, action_id: str, state: dict[str, Any], version: int) -> None:
        ns = state["api_key_id"]
        self.generations[ns] = self.generations.get(ns, 0) + 1
        self.pending.append(("prefix", f"{ns}."))

    def _entry_deleted(self, action_id: str, state: dict[str, Any], version: int) -> None:
        self.pending.append(("key", state["cache_key"]))

    def _conversation_deleted(self, action_id: str, state: dict[str, Any], version: int) -> None:
        self.pending.append(("key", history_memory_key(state["api_key_id"], state["conversation_id"])))


def history_memory_key(ns: str, conversation_id: str) -> str:
    return f"h:{ns}:{conversation_id}"
