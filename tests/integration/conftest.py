from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fila.adapters.batcher import Batcher
from fila.adapters.eventstore import FilaStore


@pytest.fixture
async def batcher(store: FilaStore) -> AsyncIterator[Batcher]:
    """A running batcher on the requesting module's ``store`` fixture."""
    b = Batcher(store, max_size=200, max_wait=0.002)
    b.start()
    try:
        yield b
    finally:
        await asyncio.to_thread(b.close)
