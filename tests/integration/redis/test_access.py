"""Per-client ACL users (`clients grant`) and configuration errors at start."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import redis

from signalgen.config.loader import load_config
from signalgen.errors import ConfigError, TransientError
from signalgen.brokers.redis import connect
from signalgen.outputs.redis import RedisSink
from signalgen.transports.redis import client_connection, grant_client
from tests.integration.redis.conftest import REPO, make_root
from tests.integration.redis.helpers import KEYS, run_cli
from tests.integration.redis.servers import RedisServer

pytestmark = pytest.mark.integration  # real redis-servers these tests start

PASSWORDS = {"ODUM_REDIS_PASSWORD": "odum-secret-1", "CHRISTIAN_REDIS_PASSWORD": "christian-secret-2"}


def test_a_client_reads_only_its_own_streams(root, monkeypatch):
    for var, value in PASSWORDS.items():
        monkeypatch.setenv(var, value)
    cfg = load_config("local-integration", "live", root=root)
    admin = connect(cfg)
    for client in ("odum", "christian"):
        admin.xadd(KEYS.signals("live", client), {"v": "1", "id": f"{client}-1", "data": "{}"})
    admin.xadd(KEYS.bars("SOLUSD", "5m"), {"v": "1"}, id="1000-0")

    proc = run_cli("clients", "grant", "--env", "local-integration", "--root", str(root), "--client", "odum",
                   env=PASSWORDS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"redis://signalgen-odum:***@127.0.0.1:{cfg.environment.messaging.url.split(':')[2]}"
    assert PASSWORDS["ODUM_REDIS_PASSWORD"] not in proc.stdout + proc.stderr
    grant_client(cfg, "christian")

    odum = client_connection(cfg, "odum")
    own = odum.xrange(KEYS.signals("live", "odum"))
    assert [f[b"id"] for _, f in own] == [b"odum-1"]
    odum.xgroup_create(KEYS.signals("live", "odum"), "odum", id="0")  # its consumer group
    assert odum.xreadgroup("odum", "me", {KEYS.signals("live", "odum"): ">"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        odum.xrange(KEYS.signals("live", "christian"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        odum.xreadgroup("christian", "me", {KEYS.signals("live", "christian"): ">"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        odum.xrange(KEYS.bars("SOLUSD", "5m"))
    with pytest.raises(redis.exceptions.NoPermissionError):  # read only: no forged signals
        odum.xadd(KEYS.signals("live", "odum"), {"v": "1"})
    christian = client_connection(cfg, "christian")
    assert christian.xlen(KEYS.signals("live", "christian")) == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        christian.xrange(KEYS.signals("live", "odum"))


def test_a_wrong_client_password_is_a_config_error(root, monkeypatch):
    monkeypatch.setenv("ODUM_REDIS_PASSWORD", "right")
    cfg = load_config("local-integration", "live", root=root)
    grant_client(cfg, "odum")
    monkeypatch.setenv("ODUM_REDIS_PASSWORD", "wrong")
    with pytest.raises(ConfigError, match="redis_password_env"):
        client_connection(cfg, "odum")
    monkeypatch.delenv("ODUM_REDIS_PASSWORD")
    with pytest.raises(ConfigError, match="ODUM_REDIS_PASSWORD is not set") as err:
        client_connection(cfg, "odum")
    assert err.value.field == "redis_password_env" and err.value.file.endswith("odum.yaml")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{closed}/0", "notredis://127.0.0.1/0", "redis://127.0.0.1:99999/0"])
def test_a_bad_url_is_a_config_error_at_start(tmp_path, registry_dir, url):
    from tests.integration.redis.servers import free_port

    root = make_root(tmp_path, registry_dir, url.format(closed=free_port()))
    cfg = load_config("local-integration", "live", root=root)
    started = time.monotonic()
    if "{closed}" in url:  # a well-formed URL nobody answers: for a worker, whose manager reached it, the
        with pytest.raises(TransientError):  # server is away (it waits for it); `feed` below still exits 2
            RedisSink.from_config(cfg)
    else:
        with pytest.raises(ConfigError) as err:
            RedisSink.from_config(cfg)
        assert err.value.field == "messaging.url" and err.value.file.endswith("local-integration.yaml")
    assert time.monotonic() - started < 5  # no retry loop
    proc = run_cli("feed", "--env", "local-integration", "--root", str(root), "--bars", "10", timeout=30)
    assert proc.returncode == 2 and "messaging.url" in proc.stderr


def test_a_wrong_password_is_a_config_error_at_start(tmp_path, registry_dir):
    server = RedisServer(tmp_path / "redis", extra=("--requirepass", "s3cret")).start()
    try:
        root = make_root(tmp_path, registry_dir, server.url, password_env="SG_TEST_REDIS_PASSWORD")
        cfg = load_config("local-integration", "live", root=root)
        for password in ("pw-nope-7731", None):
            env = {"SG_TEST_REDIS_PASSWORD": password} if password else {}
            os.environ.pop("SG_TEST_REDIS_PASSWORD", None)
            os.environ.update(env)
            try:
                with pytest.raises(ConfigError) as err:
                    RedisSink.from_config(cfg)
                assert err.value.field == "messaging.password_env"
                proc = run_cli("recorder", "--env", "local-integration", "--root", str(root), env=env, timeout=30)
                assert proc.returncode == 2 and "messaging.password_env" in proc.stderr
                assert "s3cret" not in proc.stderr and "pw-nope-7731" not in proc.stderr
            finally:
                os.environ.pop("SG_TEST_REDIS_PASSWORD", None)
        os.environ["SG_TEST_REDIS_PASSWORD"] = "s3cret"
        try:
            RedisSink.from_config(cfg).close()  # the right one works
        finally:
            os.environ.pop("SG_TEST_REDIS_PASSWORD", None)
        # and no password at all against a server that wants one
        bare = make_root(tmp_path / "bare", registry_dir, server.url)
        with pytest.raises(ConfigError) as err:
            connect(load_config("local-integration", "live", root=bare))
        assert err.value.field == "messaging.password_env"
    finally:
        server.stop()


def test_grants_survive_a_redis_restart_with_an_aclfile(tmp_path, registry_dir):
    """Redis keeps ACL users in memory only (AOF and RDB do not hold them); `clients grant` saves them
    to the server's aclfile (ACL SAVE), which a restarted Redis loads."""
    acl = tmp_path / "redis" / "users.acl"
    server = RedisServer(tmp_path / "redis", persistent=True, extra=("--aclfile", str(acl)))
    acl.write_text("")  # Redis refuses to start on a missing aclfile
    server.start()
    try:
        root = make_root(tmp_path, registry_dir, server.url)
        common = ("--env", "local-integration", "--root", str(root), "--client", "odum")
        proc = run_cli("clients", "grant", *common, env=PASSWORDS)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
        assert "signalgen-odum" in acl.read_text()
        server.stop(signal.SIGKILL)
        server.start()
        proc = run_cli("consume", *common, "--from-start", "--idle-exit", "1", env=PASSWORDS)
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()


def test_without_an_aclfile_grant_warns_and_a_lost_grant_is_named_as_such(tmp_path, registry_dir):
    """A Redis without an aclfile cannot keep a grant: `clients grant` says so, and after a restart the
    consumer's error names the client's file and the lost grant, not local-integration.yaml."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        root = make_root(tmp_path, registry_dir, server.url)
        common = ("--env", "local-integration", "--root", str(root), "--client", "odum")
        proc = run_cli("clients", "grant", *common, env=PASSWORDS)
        assert proc.returncode == 0, proc.stderr
        assert "warning" in proc.stderr and "aclfile" in proc.stderr and "lost when Redis restarts" in proc.stderr
        assert run_cli("consume", *common, "--idle-exit", "1", env=PASSWORDS).returncode == 0
        server.stop(signal.SIGKILL)
        server.start()
        proc = run_cli("consume", *common, "--idle-exit", "1", env=PASSWORDS)
        assert proc.returncode == 2
        error = " ".join(proc.stderr.split())
        assert "odum.yaml: redis_password_env" in error and "local-integration.yaml" not in error
        assert "clients grant --client odum" in error and "aclfile" in error
        assert PASSWORDS["ODUM_REDIS_PASSWORD"] not in proc.stderr
    finally:
        server.stop()


SHIPPED = ("ada", "christian", "ikenna", "odum")


@pytest.mark.shipped_clients
def test_clients_grant_works_for_every_shipped_client(tmp_path, redis_server, monkeypatch):
    """docs/streams.md tells users to export the variable their client's YAML names, then grant: this
    holds for each shipped client (the test is about those files, so it copies them by name)."""
    from tests.unit.config.helpers import make_registry

    root = tmp_path / "root"
    for folder in ("environments", "modes"):
        shutil.copytree(REPO / folder, root / folder)
    (root / "clients").mkdir()
    for client in SHIPPED:
        shutil.copy(REPO / "clients" / f"{client}.yaml", root / "clients")
    make_registry(root / "registry")  # a grant needs no model, only a config that loads
    env = root / "environments" / "local-integration.yaml"
    env.write_text(env.read_text().replace("url: redis://127.0.0.1:6379/0", f"url: {redis_server.url}"))
    passwords = {f"{client.upper()}_REDIS_PASSWORD": f"{client}-secret" for client in SHIPPED}
    for var, value in passwords.items():
        monkeypatch.setenv(var, value)
    cfg = load_config("local-integration", "live", root=root)
    assert {c.id: c.redis_password_env for c in cfg.clients} == {c: f"{c.upper()}_REDIS_PASSWORD" for c in SHIPPED}
    for client in SHIPPED:
        proc = run_cli("clients", "grant", "--env", "local-integration", "--root", str(root), "--client", client,
                       env=passwords)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().startswith(f"redis://signalgen-{client}:***@")
        assert client_connection(cfg, client).xlen(KEYS.signals("live", client)) == 0  # logged in as itself
