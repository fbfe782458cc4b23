"""How a Speculator reaches its Redis, decided by the operator's settings and never by
the Speculator's author alone (no confused deputy):

- an endpoint (host:port of spec.traces.redisUrl) that is neither the operator's managed
  Redis nor on its allowlist is refused before any connection is made or Secret read;
- on the managed Redis each Speculator gets its own ACL user, `aurora.{ns}.{name}`,
  that may touch only the keys `aurora:{ns}:{name}:*` (no other tenant's traces, which
  hold user prompts); its password is derived from the admin password (HMAC), so the
  operator never stores or reads it back, and reaches the pods through a Secret the
  operator creates (secretKeyRef);
- on an allowlisted Redis the operator does not manage, the Speculator's
  passwordSecretRef reaches the pods as a secretKeyRef, and the operator reads that
  Secret only when it carries the label aurora.dev/redis-credentials: "true".

`plan` is pure; `provision` and `deprovision` talk to the managed Redis (admin client).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aurora.operator.settings import RedisSettings
from aurora.operator.spec import SpeculatorSpec
from aurora.runtime.protocol import Keys

DEFAULT_PORT = 6379
CREDENTIALS_LABEL = "aurora.dev/redis-credentials"  # on Secrets the operator may read
PASSWORD_KEY = "password"
# What a tenant may run on its own keys: data commands, not the ones that read the
# whole keyspace (SCAN, KEYS, RANDOMKEY would list other tenants' key names), scripts,
# administration or pub/sub.
TENANT_COMMANDS = ("+@all", "-@admin", "-@dangerous", "-@scripting", "-@pubsub",
                   "-scan", "-keys", "-randomkey")  # fmt: skip


class RedisNotAllowed(ValueError):
    """The Speculator names a Redis the operator may not send credentials to."""


def endpoint(url: str) -> str:
    """`host:port` of a Redis URL (port 6379 when left out), lower-case host."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = DEFAULT_PORT
    return f"{host}:{port}"


def tenant_user(namespace: str, name: str) -> str:
    """The Speculator's Redis user. Namespaces hold no dots, so the name is unambiguous."""
    return f"aurora.{namespace}.{name}"


def tenant_password(admin_password: str, namespace: str, name: str) -> str:
    """Derived, so it is never stored by the operator: the same Speculator gets the
    same password after an operator or Redis restart."""
    message = f"aurora-tenant:{namespace}/{name}".encode()
    return hmac.new(admin_password.encode(), message, hashlib.sha256).hexdigest()


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class RedisAccess:
    """How the pods and the operator reach one Speculator's Redis."""

    url: str  # as the pods and the operator use it (with the tenant's user when managed)
    managed: bool
    secret_name: str | None = None  # the Secret the pods read the password from
    secret_key: str = PASSWORD_KEY
    password: str | None = None  # managed only: the tenant's password (derived)
    user: str | None = None

    def secret_data(self) -> dict[str, str]:
        """The managed tenant's Secret: what the operator creates for the pods."""
        return {"username": self.user or "", PASSWORD_KEY: self.password or ""}


def refusal(spec: SpeculatorSpec, settings: RedisSettings) -> str | None:
    """Why this Speculator may not use its Redis (None: it may), naming the fix."""
    url = spec.traces.redis_url
    where = endpoint(url)
    managed = settings.managed_url is not None and where == endpoint(settings.managed_url)
    if managed:
        if spec.traces.password_secret_ref is not None:
            return (
                f"spec.traces.passwordSecretRef is not used with the operator's managed Redis "
                f"{where}: each Speculator gets its own Redis user there; remove it"
            )
        if urlsplit(url).username:
            return (
                f"spec.traces.redisUrl names a user for the managed Redis {where}: the "
                "operator creates the Speculator's user; remove it from the URL"
            )
        return None
    if any(fnmatch.fnmatchcase(where, pattern) for pattern in settings.allowlist):
        return None
    allowed = [endpoint(settings.managed_url)] if settings.managed_url else []
    allowed += list(settings.allowlist)
    return (
        f"spec.traces.redisUrl points at {where}, which the operator may not send "
        f"credentials to (allowed: {', '.join(allowed) or 'none configured'}): use the "
        "managed Redis, or ask the cluster admin to add it to AURORA_REDIS_ALLOWLIST"
    )


def plan(spec: SpeculatorSpec, namespace: str, name: str, settings: RedisSettings) -> RedisAccess:
    """The access for a Speculator `refusal` let through."""
    url = spec.traces.redis_url
    managed = settings.managed_url is not None and endpoint(url) == endpoint(settings.managed_url)
    if not managed:
        ref = spec.traces.password_secret_ref
        return RedisAccess(
            url=url,
            managed=False,
            secret_name=ref.name if ref else None,
            secret_key=ref.key if ref else PASSWORD_KEY,
        )
    if not settings.admin_password:
        raise RedisNotAllowed(
            f"the managed Redis {endpoint(url)} has no admin password: set "
            "AURORA_MANAGED_REDIS_PASSWORD in the operator's environment"
        )
    user = tenant_user(namespace, name)
    password = tenant_password(settings.admin_password, namespace, name)
    # The Secret's name carries a digest of the password: a new admin password gives a
    # new Secret (created, never overwritten), and the pods roll over to it.
    digest = hashlib.sha256(password.encode()).hexdigest()[:8]
    return RedisAccess(
        url=_with_user(url, user),
        managed=True,
        secret_name=f"{name}-redis-{digest}",
        password=password,
        user=user,
    )


def acl_rules(keys: Keys, password: str) -> list[str]:
    """ACL SETUSER arguments: on, the password by its sha256 (never in clear on the
    wire or in Redis' logs), this Speculator's keys only, no channels."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return ["reset", "on", f"#{digest}", f"~{keys.prefix}:*", "resetchannels", *TENANT_COMMANDS]


def provision(admin: Any, namespace: str, name: str, password: str) -> None:
    """Create or refresh the Speculator's Redis user (idempotent: every reconcile runs
    it, so a Redis restarted without its ACLs gets them back)."""
    admin.execute_command(
        "ACL", "SETUSER", tenant_user(namespace, name), *acl_rules(Keys(namespace, name), password)
    )


def deprovision(admin: Any, namespace: str, name: str) -> None:
    admin.execute_command("ACL", "DELUSER", tenant_user(namespace, name))
