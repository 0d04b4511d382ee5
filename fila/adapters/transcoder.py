"""A msgspec transcoder for stored events (selected with ``TRANSCODER_TOPIC``).

eventsourcing 9.5.6 ships only a stdlib-JSON transcoder. FILA's events keep every field
JSON-native (str, int, bool, None, lists and dicts of those); the only non-native value in an
event's state is the library's own ``timestamp``. So this transcoder encodes with msgspec
(UTF-8 JSON, readable in psql, decodable by projections without the mapper) and restores
``timestamp`` to a ``datetime`` on the way back. Anything else that is not JSON-native is
refused at encode time, so a field can never silently come back as a different type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.persistence import Transcoder

_ALLOWED_AT_TOP = ("timestamp", "originator_id")
_SCALARS = (str, int, float, bool, type(None))


def _refuse(obj: Any) -> Any:
    raise TypeError(f"event fields must be JSON-native; got {type(obj).__name__}")


def _check(value: Any) -> None:
    """msgspec encodes UUID, datetime, Decimal, bytes... natively, as strings: refuse them here."""
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                _refuse(key)
            _check(item)
    elif isinstance(value, list):
        for item in value:
            _check(item)
    else:
        _refuse(value)


class MsgspecTranscoder(Transcoder):
    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=_refuse)
        self._decoder = msgspec.json.Decoder()

    def encode(self, obj: Any) -> bytes:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key not in _ALLOWED_AT_TOP:
                    _check(value)
        return self._encoder.encode(obj)

    def decode(self, data: bytes) -> Any:
        state = self._decoder.decode(data)
        if isinstance(state, dict):
            stamp = state.get("timestamp")
            if isinstance(stamp, str):
                state["timestamp"] = datetime.fromisoformat(stamp)
        return state
