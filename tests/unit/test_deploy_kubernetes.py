"""`deploy kubernetes`: manifests that kubernetes-validate --strict accepts for Kubernetes 1.29 and 1.37
(offline: it bundles the schemas), and that say what the fleet needs — each manager pod its ordinal's
shard, probes on the metrics port, requests from the measured USS, secrets by reference only."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from signalgen.process.shard import shard_index
from tests.roots import REPO, copy_config

VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
SENTINEL = "s3cr3t-value-never-written"


def deploy(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "strategy_runner.py"), "deploy", "kubernetes", "--root",
                           str(root), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = copy_config(tmp_path_factory.mktemp("k8s"))
    (root / "registry").symlink_to(REPO / "registry")
    return root


def workers(root: Path) -> list[str]:
    ids = []
    for path in sorted((root / "clients").glob("*.yaml")):
        client = yaml.safe_load(path.read_text())
        ids += [f"{client['id']}.{s['id']}.{sym}.{tf}" for s in client["strategies"] if s.get("enabled", True)
                for sym in s["symbols"] for tf in s["timeframes"]]
    return ids


@pytest.fixture(scope="module")
def written(root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifests")
    secrets = {name: SENTINEL for name in re.findall(r"_env:\s*([A-Z_][A-Z0-9_]*)",
                                                     "".join(p.read_text() for p in (root / "clients").glob("*")))}
    done = deploy(root, "--env", "cloud-dev", "--replicas", "3", "--out", str(out), "--worker-mb", "10",
                  "--manager-mb", "100", "--headroom", "1.5", "--start", "2025-01-01", "--end", "2025-02-01",
                  "--backfill-shards", "4", env=secrets)
    assert done.returncode == 0, done.stderr
    return out


def documents(folder: Path) -> dict[str, dict]:
    """kind/name -> document, over every file written."""
    docs = [d for p in sorted(folder.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_every_manifest_validates_strictly(written: Path, version: str, tmp_path: Path) -> None:
    files = sorted(str(p) for p in written.rglob("*.yaml"))
    assert len(files) == 5
    done = subprocess.run([VALIDATE, "-k", version, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 9  # ServiceAccount, 3 ConfigMaps, Service, StatefulSet, PDB, Deployment, Job
    # the check has teeth: a misspelt field fails it
    bad = tmp_path / "bad.yaml"
    bad.write_text((written / "02-manager.yaml").read_text().replace("podManagementPolicy", "podManagementPolicyz"))
    assert subprocess.run([VALIDATE, "-k", version, "--strict", bad], capture_output=True, timeout=120).returncode == 1


def test_each_manager_pod_runs_its_ordinals_shard_with_probes_and_scraping(written: Path) -> None:
    docs = documents(written)
    stateful = docs["StatefulSet/signalgen-manager"]
    assert stateful["spec"]["replicas"] == 3 and stateful["spec"]["podManagementPolicy"] == "Parallel"
    pod = stateful["spec"]["template"]
    [manager] = pod["spec"]["containers"]
    args = manager["args"]
    assert args[:3] == ["start", "--shard", "$(SHARD_INDEX)/3"]
    assert args[args.index("--env") + 1] == "cloud-dev" and args[args.index("--mode") + 1] == "live"
    env = {e["name"]: e for e in manager["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["SIGNALGEN_PROCESS__METRICS_HOST"]["value"] == "0.0.0.0"
    [port] = manager["ports"]
    assert port == {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    assert manager["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert manager["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                                              "prometheus.io/path": "/metrics"}
    assert docs["PodDisruptionBudget/signalgen-manager"]["spec"]["selector"]["matchLabels"] == \
        stateful["spec"]["selector"]["matchLabels"]
    assert stateful["spec"]["serviceName"] in {d["metadata"]["name"] for k, d in docs.items() if k.startswith("Service/")}
    recorder = docs["Deployment/signalgen-recorder"]["spec"]["template"]
    assert recorder["spec"]["containers"][0]["args"][0] == "recorder"
    assert recorder["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert recorder["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_the_memory_request_is_the_largest_shards_workers_plus_the_manager_with_headroom(root, written) -> None:
    """--worker-mb 10 --manager-mb 100 --headroom 1.5 over 3 shards of the demo fleet's 12 workers."""
    largest = max(sum(shard_index(w, 3) == i for w in workers(root)) for i in range(3))
    docs = documents(written)
    [manager] = docs["StatefulSet/signalgen-manager"]["spec"]["template"]["spec"]["containers"]
    assert manager["resources"] == {"requests": {"memory": f"{math.ceil((10 * largest + 100) * 1.5)}Mi"}}
    [recorder] = docs["Deployment/signalgen-recorder"]["spec"]["template"]["spec"]["containers"]
    assert recorder["resources"] == {"requests": {"memory": "150Mi"}}  # the manager's own figure x 1.5


def test_the_backfill_is_an_indexed_job_of_one_shard_per_index(written: Path) -> None:
    [job] = [d for k, d in documents(written).items() if k.startswith("Job/")]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimitPerIndex"] >= 1 and spec["template"]["spec"]["restartPolicy"] == "Never"
    [container] = spec["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:5] == ["run", "--mode", "historical", "--shard", "$(SHARD_INDEX)/4"]
    assert args[args.index("--start") + 1] == "2025-01-01T00:00:00Z" and args[args.index("--end") + 1] == "2025-02-01T00:00:00Z"
    index = {e["name"]: e for e in container["env"]}["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # `kubectl apply -f <out>` (not recursive) starts no backfill
    assert not any("kind: Job" in p.read_text() for p in written.glob("*.yaml"))


def test_the_config_folders_become_config_maps_mounted_where_the_manager_reads_them(root, written) -> None:
    docs = documents(written)
    pod = docs["StatefulSet/signalgen-manager"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for folder in ("clients", "environments", "modes"):
        data = docs[f"ConfigMap/signalgen-{folder}"]["data"]
        assert data == {p.name: p.read_text() for p in sorted((root / folder).glob("*.yaml"))}
        assert volumes[folder]["configMap"]["name"] == f"signalgen-{folder}" and mounts[folder] == f"/app/{folder}"
    assert pod["containers"][0]["args"][-2:] == ["--root", "/app"]


def test_every_variable_the_config_names_is_a_secret_reference_and_no_value_is_written(root, written) -> None:
    named = set(re.findall(r"_env:\s*([A-Z_][A-Z0-9_]*)", "".join(p.read_text() for p in (root / "clients").glob("*"))))
    assert named  # the demo clients name QuantConnect and Redis credentials
    docs = documents(written)
    for key in ("StatefulSet/signalgen-manager", "Deployment/signalgen-recorder"):
        env = {e["name"]: e for e in docs[key]["spec"]["template"]["spec"]["containers"][0]["env"]}
        for name in named:
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {
                "name": "signalgen-secrets", "key": name, "optional": True}}}
    text = "".join(p.read_text() for p in written.rglob("*") if p.is_file())
    assert SENTINEL not in text and "kind: Secret\n" not in text


def test_a_variable_of_the_environment_is_a_required_secret(root: Path, tmp_path: Path) -> None:
    env = yaml.safe_load((root / "environments/cloud-dev.yaml").read_text())
    env["messaging"] = {"type": "redis", "url": "redis://redis:6379/0", "password_env": "FLEET_REDIS_PASSWORD"}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**env, "name": "fleet"}))
    done = deploy(root, "--env", str(path), "--replicas", "2", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    [manager] = documents(tmp_path / "out")["StatefulSet/signalgen-manager"]["spec"]["template"]["spec"]["containers"]
    env_vars = {e["name"]: e for e in manager["env"]}
    assert env_vars["FLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "signalgen-secrets",
                                                                              "key": "FLEET_REDIS_PASSWORD"}
    assert manager["args"][manager["args"].index("--env") + 1] == "fleet"


def test_the_output_is_deterministic(root: Path, written: Path, tmp_path: Path) -> None:
    again = deploy(root, "--env", "cloud-dev", "--replicas", "3", "--out", str(tmp_path), "--worker-mb", "10",
                   "--manager-mb", "100", "--headroom", "1.5", "--start", "2025-01-01", "--end", "2025-02-01",
                   "--backfill-shards", "4")
    assert again.returncode == 0, again.stderr
    files = sorted(p.relative_to(written) for p in written.rglob("*.yaml"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    assert all((written / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


@pytest.mark.parametrize("args, field", [
    (("--replicas", "3", "--headroom", "0.5"), "--headroom"),
    (("--replicas", "40"), "--replicas"),  # 12 workers cannot fill 40 shards
    (("--replicas", "2", "--env", "local-dev"), "--env"),  # DuckDB: one writer on one host
    (("--replicas", "2", "--mode", "historical"), "--mode"),
    (("--replicas", "2", "--start", "someday"), "--start"),
])
def test_bad_options_are_refused_naming_the_option(root: Path, tmp_path: Path, args, field) -> None:
    done = deploy(root, *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and field in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_uss_figures_are_the_measured_ones_in_the_benchmarks() -> None:
    """The requests start from docs/benchmarks.md's Fleet table: a new measurement there must move them."""
    from signalgen.cli.kubernetes import MANAGER_USS_MB, WORKER_USS_MB

    doc = (REPO / "docs/benchmarks.md").read_text()
    fleet = doc[doc.index("<!-- bench/fleet.py:begin -->"):doc.index("<!-- bench/fleet.py:end -->")]
    header, _, row = [line for line in fleet.splitlines() if line.startswith("|")][:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["USS per worker, median (p90)"].startswith(f"{WORKER_USS_MB} MB")
    assert cells["manager USS"] == f"{MANAGER_USS_MB:g} MB"
