"""`deploy kubernetes`: the manifests of a fleet on Kubernetes, built as dicts and dumped as YAML.

- a StatefulSet of managers (`podManagementPolicy: Parallel`): pod k runs `start --shard k/N` in the
  foreground, k from the pod's `apps.kubernetes.io/pod-index` label (downward API), probed on its
  metrics port (`/healthz` alive, `/readyz` ready) and scraped there; its memory request is the
  measured USS of a worker x the workers of the largest shard + the manager's own, x a headroom
  (`process.memory_mb` stays each worker's restart threshold, not a request); a headless Service
  (the StatefulSet's) and a PodDisruptionBudget;
- a ConfigMap per config folder (clients/, environments/, modes/: keys are file names, as a ConfigMap
  key holds no '/'), mounted where `--root /app` reads them;
- the environment variables the loaded config names (every `*_env` field) from one Secret, by
  reference (secretKeyRef), never a value;
- a ServiceAccount; a recorder Deployment; an Indexed Job running a backfill in N shards
  (`run --shard <completion index>/N`), written apart (jobs/) so that applying the folder starts none.

The output is deterministic: the same config and options write the same bytes.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from signalgen.cli.app import EnvOpt, ModeOpt, RootOpt, _load, console
from signalgen.cli.deploy import STREAMING_MODES, deploy_app
from signalgen.config.models import Environment, Mode, RunConfig
from signalgen.errors import ConfigError

# the measured figures the requests start from (docs/benchmarks.md, "Fleet": 500 workers, 2026-12-05)
WORKER_USS_MB = 24.4   # USS per worker, median
MANAGER_USS_MB = 147.0  # the manager's USS (its writer or recorder included)
BACKFILL_MB = 1200     # peak RSS of a year of 1-minute bars x 10 symbols (docs/benchmarks.md, "Historical")
METRICS_PORT = 9464    # process.metrics_port's default (Prometheus' exporter range)
ROOT = "/app"          # the image's WORKDIR: registry/ is there, the config folders are mounted there
CONFIG_FOLDERS = ("clients", "environments", "modes")
APP = "signalgen"


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


def scrape(port: int) -> dict[str, str]:
    """Prometheus' annotation-based discovery (the kubernetes_sd `prometheus.io/*` convention)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def metrics_port(cfg: RunConfig) -> int:
    """`process.metrics_port` when the config has one (0, any free port, cannot be probed: the default)."""
    return getattr(cfg.environment.process, "metrics_port", 0) or METRICS_PORT


def secret_variables(cfg: RunConfig) -> dict[str, bool]:
    """Every environment variable the loaded config names (its `*_env` fields), sorted -> whether the
    processes need it: the environment's own are required, a client's (credentials of a feature that
    client uses, e.g. QuantConnect uploads) optional."""
    found: dict[str, bool] = {}

    def walk(node: Any, required: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    found[value] = found.get(value, False) or required
                else:
                    walk(value, required)
        elif isinstance(node, list):
            for item in node:
                walk(item, required)

    walk(cfg.environment.model_dump(), True)
    walk([c.model_dump() for c in cfg.clients], False)
    return dict(sorted(found.items()))


def largest_shard(cfg: RunConfig, replicas: int) -> int:
    """Workers of the largest of `replicas` shards; ConfigError naming --replicas when one is empty (its
    pod's `start` would refuse to run)."""
    from signalgen.config.workers import worker_specs
    from signalgen.process.shard import take_shard

    specs = worker_specs(cfg)
    sizes = [len(take_shard(specs, i, replicas)) for i in range(replicas)]
    if empty := [i for i, n in enumerate(sizes) if n == 0]:
        raise ConfigError(f"{len(specs)} workers leave shard {empty[0]}/{replicas} empty (a pod with no worker "
                          "fails to start): use fewer replicas", field="--replicas")
    return max(sizes)


def memory_request_mi(workers: int, *, worker_mb: float, manager_mb: float, headroom: float) -> int:
    """A manager pod's memory request in MiB: (worker USS x workers + the manager's) x headroom, rounded up."""
    return math.ceil((worker_mb * workers + manager_mb) * headroom)


class Manifests:
    """The manifests of one fleet: `files()` maps a relative path to its YAML documents."""

    def __init__(self, cfg: RunConfig, *, replicas: int, image: str, secret: str, worker_mb: float,
                 manager_mb: float, headroom: float, backfill: tuple[datetime, datetime], backfill_shards: int,
                 backfill_mb: int, config_files: dict[str, dict[str, str]]) -> None:
        self.cfg, self.replicas, self.image, self.secret = cfg, replicas, image, secret
        self.port = metrics_port(cfg)
        self.workers = largest_shard(cfg, replicas)
        self.memory_mi = memory_request_mi(self.workers, worker_mb=worker_mb, manager_mb=manager_mb,
                                           headroom=headroom)
        self.recorder_mi = memory_request_mi(0, worker_mb=worker_mb, manager_mb=manager_mb, headroom=headroom)
        self.backfill_range, self.backfill_shards, self.backfill_mb = backfill, backfill_shards, backfill_mb
        self.config_files = config_files

    # ------------------------------------------------------------ pieces

    def _env(self, *, metrics: bool, index: str | None) -> list[dict]:
        env = [{"name": "SHARD_INDEX", "valueFrom": {"fieldRef": {"fieldPath": index}}}] if index else []
        if metrics:  # probed and scraped from outside the pod: on every address, on the manifest's port
            env += [{"name": "SIGNALGEN_PROCESS__METRICS_HOST", "value": "0.0.0.0"},
                    {"name": "SIGNALGEN_PROCESS__METRICS_PORT", "value": str(self.port)}]
        for name, required in secret_variables(self.cfg).items():
            ref = {"name": self.secret, "key": name, **({} if required else {"optional": True})}
            env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
        return env

    def _container(self, name: str, args: list[str], *, metrics: bool, memory_mi: int,
                   index: str | None = None) -> dict:
        """A container running `strategy_runner.py <args>`; `index`: the field the pod's shard index
        comes from (downward API), as $(SHARD_INDEX)."""
        container: dict[str, Any] = {
            "name": name, "image": self.image, "imagePullPolicy": "IfNotPresent",
            "args": [*args, "--env", self.cfg.environment.name, "--root", ROOT],
            "env": self._env(metrics=metrics, index=index),
            "resources": {"requests": {"memory": f"{memory_mi}Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [*({"name": f, "mountPath": f"{ROOT}/{f}", "readOnly": True} for f in CONFIG_FOLDERS),
                             {"name": "var", "mountPath": f"{ROOT}/var"}, {"name": "tmp", "mountPath": "/tmp"}],
        }
        if metrics:
            probe = {"httpGet": {"path": "/healthz", "port": "metrics"}, "timeoutSeconds": 5}
            container |= {
                "ports": [{"name": "metrics", "containerPort": self.port, "protocol": "TCP"}],
                # start-up: 500 workers were all RUNNING after 46-53 s (docs/benchmarks.md); allow 4 min
                "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 48},
                "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "timeoutSeconds": 5,
                                   "periodSeconds": 5, "failureThreshold": 3},
            }
        return container

    def _pod(self, containers: list[dict], *, restart: str = "Always") -> dict:
        grace = math.ceil(self.cfg.environment.process.stop_timeout_s) + 30  # workers' SIGKILL, then flush
        return {
            "serviceAccountName": APP, "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": grace, "restartPolicy": restart,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": containers,
            "volumes": [*({"name": f, "configMap": {"name": f"{APP}-{f}"}} for f in CONFIG_FOLDERS),
                        {"name": "var", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        }

    def _args(self, *args: str) -> list[str]:
        return [*args, "--mode", self.cfg.mode.name.value]

    # ------------------------------------------------------------ resources

    def service_account(self) -> dict:
        return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": APP, "labels": labels("fleet")},
                "automountServiceAccountToken": False}

    def config_maps(self) -> list[dict]:
        return [{"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": f"{APP}-{folder}", "labels": labels("config")},
                 "data": dict(sorted(files.items()))} for folder, files in self.config_files.items()]

    def manager(self) -> list[dict]:
        container = self._container("manager", self._args("start", "--shard", f"$(SHARD_INDEX)/{self.replicas}"),
                                    metrics=True, memory_mi=self.memory_mi,
                                    index="metadata.labels['apps.kubernetes.io/pod-index']")
        name, selector = f"{APP}-manager", labels("manager")
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": selector},
                   "spec": {"clusterIP": "None", "selector": selector,
                            "ports": [{"name": "metrics", "port": self.port, "targetPort": "metrics"}]}}
        stateful = {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": selector},
            "spec": {"serviceName": name, "replicas": self.replicas, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": selector, "annotations": scrape(self.port)},
                                  "spec": self._pod([container])}},
        }
        budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "labels": selector},
                  "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}
        return [service, stateful, budget]

    def recorder(self) -> dict:
        selector = labels("recorder")
        container = self._container("recorder", self._args("recorder"), metrics=True, memory_mi=self.recorder_mi)
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{APP}-recorder", "labels": selector},
                "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                         "template": {"metadata": {"labels": selector, "annotations": scrape(self.port)},
                                      "spec": self._pod([container])}}}

    def backfill(self) -> dict:
        start, end = (f"{t:%Y-%m-%dT%H:%M:%SZ}" for t in self.backfill_range)
        container = self._container(
            "backfill", ["run", "--mode", "historical", "--shard", f"$(SHARD_INDEX)/{self.backfill_shards}",
                         "--start", start, "--end", end, "--no-progress"],
            metrics=False, memory_mi=self.backfill_mb,
            index="metadata.annotations['batch.kubernetes.io/job-completion-index']")
        selector = labels("backfill")
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": self.backfill_name, "labels": selector},
                "spec": {"completionMode": "Indexed", "completions": self.backfill_shards,
                         "parallelism": self.backfill_shards, "backoffLimitPerIndex": 2,
                         "ttlSecondsAfterFinished": 7 * 86400,
                         "template": {"metadata": {"labels": selector}, "spec": self._pod([container], restart="Never")}}}

    @property
    def backfill_name(self) -> str:
        start, end = self.backfill_range
        return f"{APP}-backfill-{start:%Y%m%d%H%M}-{end:%Y%m%d%H%M}"

    def files(self) -> dict[str, list[dict]]:
        return {"00-serviceaccount.yaml": [self.service_account()], "01-config.yaml": self.config_maps(),
                "02-manager.yaml": self.manager(), "03-recorder.yaml": [self.recorder()],
                f"jobs/{self.backfill_name}.yaml": [self.backfill()]}


def dump(documents: list[dict]) -> str:
    """YAML documents as written: keys in the order built, no anchors (a reader sees every value)."""
    import yaml

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return "---\n".join(yaml.dump(d, Dumper=Plain, sort_keys=False, width=120) for d in documents)


def read_config_folders(root: Path) -> dict[str, dict[str, str]]:
    """folder -> {file name: text} of the YAML files of clients/, environments/ and modes/ (a ConfigMap
    holds at most 1 MiB: larger folders are refused)."""
    out: dict[str, dict[str, str]] = {}
    for folder in CONFIG_FOLDERS:
        files = {p.name: p.read_text() for p in sorted((root / folder).glob("*.y*ml")) if p.is_file()}
        if sum(len(t.encode()) for t in files.values()) > 1_000_000:
            raise ConfigError(f"{root / folder} holds over 1 MB of YAML, more than a ConfigMap takes",
                              field=folder)
        out[folder] = files
    return out


@deploy_app.command("kubernetes")
def deploy_kubernetes(
        replicas: Annotated[int, typer.Option(min=1, max=1000, help="Manager pods: pod k runs shard k/N.")],
        env: EnvOpt = Environment.CLOUD_DEV, mode: ModeOpt = Mode.LIVE, root: RootOpt = None,
        out: Annotated[Optional[Path], typer.Option(help="Folder for the manifests "
                                                    "(default: <root>/var/<env>/kubernetes).")] = None,
        image: Annotated[str, typer.Option(help="The image built from the Dockerfile.")] = "signalgen:0.1.0",
        secret: Annotated[str, typer.Option(help="The Secret holding the variables the config names.")]
        = "signalgen-secrets",
        worker_mb: Annotated[float, typer.Option(
            min=1, help=f"USS per worker, MB (default: the median measured at 500 workers, {WORKER_USS_MB} MB, "
                        "docs/benchmarks.md, Fleet).")] = WORKER_USS_MB,
        manager_mb: Annotated[float, typer.Option(
            min=1, help=f"The manager's own USS, MB (default: measured at 500 workers, {MANAGER_USS_MB:g} MB, "
                        "docs/benchmarks.md, Fleet).")] = MANAGER_USS_MB,
        headroom: Annotated[float, typer.Option(help="Requests = measured x this (at least 1).")] = 1.25,
        start: Annotated[Optional[str], typer.Option(help="The backfill Job's start (default: the historical "
                                                     "preset's).")] = None,
        end: Annotated[Optional[str], typer.Option(help="The backfill Job's end (default: the historical "
                                                   "preset's).")] = None,
        backfill_shards: Annotated[Optional[int], typer.Option(min=1, max=1000, help="The backfill Job's "
                                                               "shards (default: --replicas).")] = None,
        backfill_mb: Annotated[int, typer.Option(min=64, help="Memory request of a backfill pod, MiB (default: "
                                                 "the peak RSS of a year of 1-minute bars x 10 symbols, "
                                                 "docs/benchmarks.md, Historical).")] = BACKFILL_MB,
) -> None:
    """Write the Kubernetes manifests of a fleet: managers (StatefulSet), recorder, config, backfill Job.

    Then: `kubectl apply -f <out>` (the fleet), `kubectl create -f <out>/jobs/<job>.yaml` (a backfill).
    """
    from signalgen.cli.app import parse_time

    if mode not in STREAMING_MODES:
        raise ConfigError(f"the managers run long-lived workers: mode must be one of "
                          f"{', '.join(m.value for m in STREAMING_MODES)}, not {mode.value}", field="--mode")
    if not 1.0 <= headroom <= 10.0:
        raise ConfigError(f"must be between 1 and 10 (got {headroom:g})", field="--headroom")
    times = {}
    for option, value in (("--start", start), ("--end", end)):
        try:
            times[option] = parse_time(value) if value is not None else None
        except ValueError as exc:
            raise ConfigError(str(exc), field=option) from None
    cfg = _load(env, mode, root)
    if cfg.environment.storage.type == "duckdb":
        raise ConfigError(f"environment {cfg.environment.name} stores in a DuckDB file, which one process on one "
                          "host writes: pods need a shared store (storage.type bigquery, e.g. cloud-dev)",
                          field="--env")
    backfill = _load(env, Mode.HISTORICAL, root, start=times["--start"], end=times["--end"])
    root_dir = Path(cfg.root)
    manifests = Manifests(cfg, replicas=replicas, image=image, secret=secret, worker_mb=worker_mb,
                          manager_mb=manager_mb, headroom=headroom, backfill=(backfill.start, backfill.end),
                          backfill_shards=backfill_shards or replicas, backfill_mb=backfill_mb,
                          config_files=read_config_folders(root_dir))
    folder = (out or root_dir / "var" / cfg.environment.name / "kubernetes").resolve()
    for name, documents in manifests.files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump(documents))
    console.print(f"wrote {folder}: {replicas} manager pods of up to {manifests.workers} workers, "
                  f"{manifests.memory_mi} MiB requested each\napply: kubectl apply -f {folder}\n"
                  f"backfill: kubectl create -f {folder / 'jobs' / (manifests.backfill_name + '.yaml')}",
                  highlight=False)
