"""Configuration models: data, frozen, no unknown keys.

Three layers are loaded in this order (later wins where they overlap), then CLI overrides:
environment profile (`environments/*.yaml`) -> mode preset (`modes/*.yaml`) -> clients
(`clients/*.yaml`). `signalgen.config.loader.load_config` is the one loader.
Secrets never appear here: client YAML names environment variables (`*_env` fields).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Environment(StrEnum):
    """The shipped environment profiles (`environments/<name>.yaml`), offered as `--env` choices. An
    environment file elsewhere carries any safe name (`EnvironmentConfig.name`)."""

    LOCAL_DEV = "local-dev"
    LOCAL_INTEGRATION = "local-integration"
    CLOUD_DEV = "cloud-dev"


class Mode(StrEnum):
    MOCK = "mock"
    LIVE = "live"
    SIMULATION = "simulation"
    HISTORICAL = "historical"


class Routing(StrEnum):
    QUANTCONNECT = "quantconnect"
    INTERNAL = "internal"
    BOTH = "both"


class Aggregation(StrEnum):
    WEIGHTED = "weighted"
    MAJORITY = "majority"
    UNANIMOUS = "unanimous"


# Safe as a file name, a DuckDB/BigQuery identifier part, a Redis stream and a Pub/Sub topic name.
SAFE_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SafeId = Annotated[str, StringConstraints(pattern=SAFE_ID)]
Symbol = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9._-]{0,31}$")]
EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")]

_TIMEFRAME = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def timeframe_delta(timeframe: str) -> timedelta:
    """Duration of one bar: "5m" -> 5 minutes. Raises ValueError on anything else."""
    m = _TIMEFRAME.match(timeframe)
    if not m:
        raise ValueError(f"timeframe {timeframe!r} is not <n><s|m|h|d>, e.g. 1m, 5m, 1h, 1d")
    return timedelta(**{_UNIT[m.group(2)]: int(m.group(1))})


def default_max_gap(timeframe: str) -> timedelta:
    """One bar for intraday timeframes; for daily and longer, 4 days (weekend plus a holiday)."""
    tf = timeframe_delta(timeframe)
    return tf if tf < timedelta(days=1) else max(tf, timedelta(days=4))


def _check_timeframe(value: str) -> str:
    timeframe_delta(value)
    return value


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


Timeframe = Annotated[str, AfterValidator(_check_timeframe)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


# ---------------------------------------------------------------- clients


class ModelRefConfig(Frozen):
    """One model of a strategy. `model_id` must be in the model registry."""

    model_id: SafeId
    weight: float = Field(1.0, gt=0)
    confidence_threshold: Probability
    lookback_window: int = Field(20, ge=1, le=10_000)
    max_age_days: int = Field(365, ge=1)


class VolatilityFilterConfig(Frozen):
    """Suppress signals when realized volatility (per-bar std of log returns) is outside [min, max]."""

    enabled: bool = False
    feature: Literal["vol_20", "vol_60"] = "vol_20"
    min: float = Field(0.0, ge=0)
    max: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _band(self) -> VolatilityFilterConfig:
        if self.min >= self.max:
            raise ValueError(f"volatility band min ({self.min}) must be below max ({self.max})")
        return self


class TrendFilterConfig(Frozen):
    """When enabled, a signal's direction must agree with the sign of the trend feature."""

    enabled: bool = False
    feature: Literal["sma_ratio_10_50", "ret_60"] = "sma_ratio_10_50"


class FiltersConfig(Frozen):
    volatility: VolatilityFilterConfig = VolatilityFilterConfig()
    trend_confirmation: TrendFilterConfig = TrendFilterConfig()


class SizingConfig(Frozen):
    """weight = strength x fraction (fixed_fraction) or strength x target_volatility / realized
    volatility (volatility_target), capped by max_position and the client's gross-exposure budget."""

    method: Literal["fixed_fraction", "volatility_target"] = "fixed_fraction"
    fraction: float = Field(0.1, gt=0, le=1)
    target_volatility: float = Field(0.002, gt=0)
    max_position: float = Field(0.25, gt=0, le=1)


class StrategyConfig(Frozen):
    id: SafeId
    symbols: list[Symbol] = Field(min_length=1)
    timeframes: list[Timeframe] = Field(min_length=1)
    models: list[ModelRefConfig] = Field(min_length=1)
    filters: FiltersConfig = FiltersConfig()
    aggregation: Aggregation = Aggregation.WEIGHTED
    sizing: SizingConfig = SizingConfig()
    routing: Routing | None = None  # overrides the client's routing for this strategy
    max_staleness_bars: float = Field(2.0, gt=0)
    enabled: bool = True
    # What the manager does when one of this strategy's workers fails (crash, stale heartbeat, over
    # memory): restart with backoff (FATAL after process.max_recovery_attempts), pause, or stop.
    recovery: Literal["restart", "pause", "stop"] = "restart"

    @model_validator(mode="after")
    def _unique(self) -> StrategyConfig:
        for name, items in (("symbols", self.symbols), ("timeframes", self.timeframes),
                            ("models", [m.model_id for m in self.models])):
            dup = sorted({x for x in items if items.count(x) > 1})
            if dup:
                raise ValueError(f"duplicate {name}: {', '.join(dup)}")
        return self


class QuantConnectConfig(Frozen):
    """Names of environment variables holding QuantConnect credentials, never their values."""

    user_id_env: EnvVarName | None = None
    api_token_env: EnvVarName | None = None
    project_id_env: EnvVarName | None = None
    upload: bool = False


class ClientConfig(Frozen):
    id: SafeId
    name: str | None = None
    accounts: dict[str, str] = {}  # exchange -> account identifier (not a secret)
    routing: Routing
    max_gross_exposure: float = Field(1.0, gt=0, le=10)
    quantconnect: QuantConnectConfig = QuantConnectConfig()
    redis_password_env: EnvVarName | None = None  # password of this client's Redis ACL user (`clients grant`)
    strategies: list[StrategyConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_strategies(self) -> ClientConfig:
        ids = [s.id for s in self.strategies]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate strategy ids: {', '.join(dup)}")
        return self

    def routing_for(self, strategy: StrategyConfig) -> Routing:
        return strategy.routing or self.routing


# ---------------------------------------------------------------- environments


class DuckDBStorageConfig(Frozen):
    type: Literal["duckdb"]
    path: str


class BigQueryStorageConfig(Frozen):
    type: Literal["bigquery"]
    project: str
    dataset_prefix: str = "signalgen"  # one dataset per client: <prefix>_<client>
    location: str = "US"
    # http://host:port of an emulator; else $BIGQUERY_EMULATOR_HOST (host:port), else BigQuery itself
    # with Application Default Credentials
    api_endpoint: str | None = None


class LocalMessagingConfig(Frozen):
    type: Literal["local"]
    path: str  # one JSON-lines file per client under this folder


class RedisMessagingConfig(Frozen):
    type: Literal["redis"]
    url: str = "redis://127.0.0.1:6379/0"
    password_env: EnvVarName | None = None
    stream_prefix: str = "signalgen"
    maxlen: int = Field(100_000, gt=0)
    # a bar may end at most one bar interval plus this long after the wall clock: `feed` refuses later
    # ones, a live worker dead-letters them (one would make Redis refuse every real bar before it)
    max_ahead_s: float = Field(300.0, ge=0)


class PubSubMessagingConfig(Frozen):
    """Google Pub/Sub (cloud-dev); names and behaviour in signalgen/brokers/pubsub.py."""

    type: Literal["pubsub"]
    project: str
    topic_prefix: SafeId = "signalgen"  # part of every topic and subscription name
    # a publisher holds at most this many unconfirmed messages / bytes; a full publisher blocks the
    # worker (backpressure); a subscriber leases at most as many at once
    max_outstanding_messages: int = Field(1000, ge=1)
    max_outstanding_bytes: int = Field(10 * 2**20, ge=2**16)
    ack_deadline_s: int = Field(60, ge=10, le=600)  # of every subscription: unacked this long -> redelivered
    # deliveries of a message whose handling fails before it goes to its subscription's dead-letter topic
    max_delivery_attempts: int = Field(5, ge=5, le=100)
    # a streaming pull that delivered nothing this long while messages are expected is restarted
    watchdog_s: float = Field(120.0, gt=0)
    # a bar may end at most one bar interval plus this long after the wall clock (`feed` refuses later ones)
    max_ahead_s: float = Field(300.0, ge=0)


StorageConfig = Annotated[DuckDBStorageConfig | BigQueryStorageConfig, Field(discriminator="type")]
MessagingConfig = Annotated[
    LocalMessagingConfig | RedisMessagingConfig | PubSubMessagingConfig, Field(discriminator="type")
]


class DependenciesConfig(Frozen):
    market_data: Literal["mock", "files", "stream"] = "mock"
    ml_inference: Literal["mock", "local"] = "local"


class ProcessLimitsConfig(Frozen):
    """Limits and supervision settings for worker processes (see signalgen.process.states)."""

    memory_mb: int = Field(1024, ge=64)  # max USS (RSS where USS is unavailable) per worker before a restart
    cpu: float = Field(1.0, gt=0)
    # workers run this many CPU niceness steps below the manager (POSIX nice, 0-19): above 0, a burst
    # of workers (bars of many symbols closing at once) leaves the cores first to the processes every
    # bar's path also needs — Redis, consumers, the manager
    nice: int = Field(0, ge=0, le=19)
    heartbeat_interval_s: float = Field(2.0, gt=0)  # a worker writes a heartbeat this often
    heartbeat_threshold_s: float = Field(30.0, gt=0)  # an older heartbeat: the worker is killed and recovered
    max_errors_per_minute: int = Field(10, ge=0)  # more marks a worker unhealthy
    max_recovery_attempts: int = Field(5, ge=0)  # consecutive failed restarts before FATAL
    backoff_initial_s: float = Field(1.0, gt=0)  # first restart delay; doubles per consecutive failure
    backoff_max_s: float = Field(60.0, gt=0)  # cap on the restart delay
    stop_timeout_s: float = Field(10.0, gt=0)  # SIGTERM -> SIGKILL after this long
    resource_sample_s: float = Field(5.0, gt=0)  # CPU%/memory sampling period
    mock_bar_interval_s: float = Field(1.0, ge=0)  # streaming mock: wall seconds between bars per worker
    log_max_mb: float = Field(10.0, gt=0)  # manager.log and each worker's log rotate at this size ...
    log_backups: int = Field(5, ge=0, le=100)  # ... keeping this many old files
    # /healthz, /readyz and /metrics of the manager, writer and recorder processes (docs/operations.md):
    # one port per process on a host; 0 picks a free one (logged: "metrics: http://HOST:PORT/metrics")
    metrics_host: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:_-]{1,253}$")] = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> ProcessLimitsConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_initial_s "
                             f"({self.backoff_initial_s})")
        if self.heartbeat_threshold_s <= self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_threshold_s ({self.heartbeat_threshold_s}) must be above "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s})")
        return self


class ControlStoreConfig(Frozen):
    """The control store: worker instances, commands, heartbeats, resources, events (signalgen.storage.control).

    Separate from the signal store. `sqlite` (the default): one file in WAL mode, one manager.
    `postgres`: one database shared by several managers (one lease per shard), its libpq DSN in the
    environment variable `dsn_env` (never in YAML); `path` is then each manager's node-local spool.
    """

    type: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "var/control.sqlite"  # relative to the run's root
    dsn_env: EnvVarName = "SIGNALGEN_CONTROL_DSN"  # postgres: the variable holding the DSN
    # postgres: a manager renews its shard's lease every tick; one not renewed this long is taken over
    lease_ttl_s: float = Field(15.0, ge=2, le=3600)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)  # postgres: a store that does not answer is down


class PathsConfig(Frozen):
    registry_dir: str = "registry"
    data_dir: str = "var/data"
    output_dir: str = "var/out"
    # the umask of every process (octal): 077 makes what signalgen creates — stores, control store,
    # logs, streams, CSV files — 0600, and its folders 0700; they hold tenants' signals
    umask: Annotated[str, StringConstraints(pattern=r"^0?[0-7]{3}$")] = "077"


class EnvironmentConfig(Frozen):
    name: SafeId  # names the environment in records and its folder var/<name>/
    storage: StorageConfig
    messaging: MessagingConfig
    dependencies: DependenciesConfig = DependenciesConfig()
    process: ProcessLimitsConfig = ProcessLimitsConfig()
    control: ControlStoreConfig = ControlStoreConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    paths: PathsConfig = PathsConfig()


# ---------------------------------------------------------------- modes


class ModePreset(Frozen):
    name: Mode
    data_source: Literal["environment", "synthetic", "files", "stream"] = "environment"
    start: UtcDatetime | None = None
    end: UtcDatetime | None = None
    seed: int = 7
    replay_speed: float | None = Field(None, ge=0)  # simulation: 0 = as fast as possible
    chunk_bars: int = Field(50_000, ge=100)  # historical: bars per symbol per chunk

    @model_validator(mode="after")
    def _range(self) -> ModePreset:
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self


# ---------------------------------------------------------------- resolved


class RunConfig(Frozen):
    """Everything a run needs, resolved: environment -> mode -> clients -> CLI overrides."""

    environment: EnvironmentConfig
    mode: ModePreset
    clients: list[ClientConfig]
    data_source: Literal["synthetic", "files", "stream"]
    inference: Literal["mock", "local"]
    backend: Literal["onnx", "lightgbm"] = "onnx"
    start: UtcDatetime
    end: UtcDatetime
    seed: int
    root: str  # folder relative paths resolve against
    files: dict[str, str] = {}  # layer -> file it came from, for messages
    # environment key (dotted) -> the SIGNALGEN_* variable that set it; not dumped: the values are in `environment`
    overrides: dict[str, str] = Field(default={}, exclude=True)
    config_hash: str = ""

    @property
    def environment_ref(self) -> str:
        """What `--env` takes to load this environment again: its name when the file is the shipped
        `<root>/environments/<name>.yaml`, else the file's path."""
        path = self.files.get("environment")
        shipped = Path(self.root) / "environments" / f"{self.environment.name}.yaml"
        if path is None or (self.environment.name in set(Environment) and Path(path) == shipped):
            return self.environment.name
        return path

    def client(self, client_id: str) -> ClientConfig:
        for c in self.clients:
            if c.id == client_id:
                return c
        raise KeyError(client_id)
