"""Redis: key names (`StreamKeys`), connections, and the scripts every Redis user shares.

Layout and contract: docs/streams.md. `redis` is imported lazily (`redis_module`), so only runs that
use Redis need `pip install 'signalgen[redis]'`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from signalgen.errors import ConfigError, SignalgenError

if TYPE_CHECKING:
    import redis as redis_lib

    from signalgen.config.models import RunConfig

RECORDER_GROUP = "recorder"


def redis_module():
    """The redis package, or ImportError telling how to install it."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ImportError("Redis messaging needs the redis package: pip install 'signalgen[redis]'") from exc
    return redis


@dataclass(frozen=True)
class StreamKeys:
    """Key names under one `messaging.stream_prefix` (docs/streams.md).

    Workers write the `internal` streams, which no client's user may touch; the decision host (the
    recorder) reads them, and is the only writer of the clients' `signals` / `rejections` streams.
    """

    prefix: str = "signalgen"

    def bars(self, symbol: str, timeframe: str) -> str:
        return f"{self.prefix}:bars:{symbol}:{timeframe}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter:bars"

    def deadletter_seen(self, symbol: str, timeframe: str) -> str:
        """The set of the ids of `bars(symbol, timeframe)` entries already dead-lettered (one copy each)."""
        return f"{self.prefix}:deadletter:seen:{symbol}:{timeframe}"

    def signals(self, mode: str, client: str) -> str:
        return f"{self.prefix}:{mode}:signals:{client}"

    def rejections(self, mode: str, client: str) -> str:
        return f"{self.prefix}:{mode}:rejections:{client}"

    def internal(self, mode: str, kind: str, client: str) -> str:
        """A worker's decisions of `kind` ("signals" or "rejections") for `client`, before the host."""
        return f"{self.prefix}:{mode}:internal:{kind}:{client}"

    def bar_rejections(self, mode: str) -> str:
        return f"{self.prefix}:{mode}:internal:bar_rejections"

    def forwarded(self, mode: str) -> str:
        """Hash: internal stream -> the id of its last entry the host wrote to a client's stream."""
        return f"{self.prefix}:{mode}:internal:forwarded"

    def checkpoints(self, mode: str) -> str:
        return f"{self.prefix}:{mode}:checkpoints"

    def acl_user(self, client: str) -> str:
        """The Redis user of a client (`clients grant`); no ':' so it fits in a URL's user part."""
        return f"{self.prefix}-{client}"

    def client_streams(self, client: str, modes: tuple[str, ...] | None = None) -> list[str]:
        """A client's own streams — its signals and rejections of every mode (or of `modes`): all the
        keys its user may touch."""
        from signalgen.config.models import Mode

        return [key(m, client) for m in modes or [m.value for m in Mode] for key in (self.signals, self.rejections)]


def acl_key_pattern(key: str) -> str:
    """`key` as an ACL key pattern that matches it alone (glob characters escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in key)


# Creates each stream in KEYS that does not exist yet, empty (an entry added and trimmed at once): a
# client's user may then create consumer groups on its streams but never a key (MKSTREAM finds them).
ENSURE_STREAMS_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('XADD', key, 'MAXLEN', '0', '*', 'v', '0')
  end
end
return #KEYS
"""


def ensure_streams(client: redis_lib.Redis, keys: list[str]) -> None:
    """Create the streams among `keys` that do not exist yet (empty); existing ones are untouched."""
    if keys:
        client.eval(ENSURE_STREAMS_SCRIPT, len(keys), *keys)


# ---------------------------------------------------------------- connections


def connect(cfg: RunConfig, *, username: str | None = None, password: str | None = None,
            password_field: str = "messaging.password_env", socket_timeout: float = 5.0,
            check: bool = True, down: type[SignalgenError] = ConfigError) -> redis_lib.Redis:
    """A client of the environment's Redis, checked with PING unless `check` is false.

    The password is `password` if given, else the value of `messaging.password_env`. Anything wrong at
    start — a URL that does not parse, a server that does not answer, a wrong password — is a
    ConfigError naming the field (exit 2): a worker never loops on a configuration mistake. A server
    that does not answer raises `down` instead: a worker whose manager already reached Redis passes
    TransientError (the server is away, not misconfigured: wait for it). The client does not retry
    by itself (retries are the caller's, who knows what is safe to repeat).
    """
    redis = redis_module()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    m = cfg.environment.messaging
    file = cfg.files.get("environment")
    if m.type != "redis":
        raise ConfigError(f"messaging type {m.type!r} is not redis", file=file, field="messaging.type")
    if password is None and m.password_env:
        password = os.environ.get(m.password_env)
        if password is None:
            raise ConfigError(f"environment variable {m.password_env} is not set", file=file, field=password_field)
    try:
        client = redis.Redis.from_url(m.url, username=username, password=password, socket_timeout=socket_timeout,
                                      socket_connect_timeout=min(socket_timeout, 2.0), retry=Retry(NoBackoff(), 0))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a Redis URL ({exc})", file=file, field="messaging.url") from None
    if check:
        check_connection(client, cfg, password_field=password_field, down=down)
    return client


def own_connection(client: redis_lib.Redis):
    """A connection with `client`'s settings, outside its pool, connected by its first command and
    again by the first after a `disconnect()`: for a hot command sent `straight`."""
    pool = client.connection_pool
    return pool.connection_class(**pool.connection_kwargs)


def straight(conn, *command):
    """`command` on `conn` and its raw reply, without the client's command layer (connection checkout,
    retry wrapper, reply callbacks): ~70 -> ~40 us of CPU per XREAD in process, more on the cold core
    a live bar finds. A lost or timed-out connection is dropped before the error goes up, so a late
    reply can never answer the next command; the next call reconnects."""
    redis = redis_module()
    try:
        conn.send_command(*command)
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        raise


def check_connection(client: redis_lib.Redis, cfg: RunConfig, *, password_field: str,
                     down: type[SignalgenError] = ConfigError) -> None:
    """PING; a failure becomes a ConfigError naming the field at fault (`down` for no answer)."""
    redis = redis_module()
    file = cfg.files.get("environment")
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConfigError(f"Redis refused the password ({exc})", file=file, field=password_field) from None
    except redis.ResponseError as exc:  # e.g. AUTH without a configured password, NOAUTH
        text = str(exc)
        if "AUTH" in text.upper() or "PASSWORD" in text.upper():
            raise ConfigError(f"Redis refused the login ({text})", file=file, field=password_field) from None
        raise ConfigError(f"Redis at {masked_url(cfg.environment.messaging.url)} answered {text!r}", file=file,
                          field="messaging.url") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        text = f"cannot reach Redis at {masked_url(cfg.environment.messaging.url)} ({exc})"
        if down is not ConfigError:
            raise down(text) from None
        raise ConfigError(f"{text}; is the URL right and the server running?", file=file,
                          field="messaging.url") from None


def masked_url(url: str, username: str | None = None, password: bool = False) -> str:
    """`url` with `username` set (if given) and any password shown as ***."""
    parts = urlsplit(url)
    user = username if username is not None else parts.username
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    auth = ""
    if user:
        auth = quote(user, safe="") + (":***" if password or parts.password else "") + "@"
    elif password or parts.password:
        auth = ":***@"
    return urlunsplit((parts.scheme, auth + host, parts.path, parts.query, parts.fragment))


def read_checkpoints(client: redis_lib.Redis, keys: StreamKeys, mode: str) -> dict[str, datetime]:
    """Worker id -> last bar time durably in the streams (the `<p>:<mode>:checkpoints` hash)."""
    return {k.decode(): datetime.fromisoformat(v.decode()) for k, v in client.hgetall(keys.checkpoints(mode)).items()}
