"""Settings (URL precedence, redaction) and the embedded SecantusDB daemon, against real servers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pymongo
import pytest
from click.testing import CliRunner

from pqa_core.errors import PqaError, UsageError
from pqa_experiments.store import db
from pqa_experiments.store import settings
from pqa_experiments.store import urls
from pqa_experiments.cli.db import db as db_cli

from conftest import free_port, listen_addresses

PASSWORD = "s3cr3t-Pa55"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No ambient PQA_* settings; config and data dirs inside tmp_path."""
    for var in ("PQA_MONGO_URL", "PQA_CONFIG", "PQA_HOME", "PQA_DB_PORT", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# --------------------------------------------------------------------------- settings


def test_url_precedence_argument_env_config_default(clean_env, monkeypatch):
    cfg = clean_env / "home" / ".config" / "pqa" / "config.toml"
    assert settings.resolve_mongo() == settings.MongoTarget("mongodb://127.0.0.1:27117/", "pqa", "embedded")

    cfg.parent.mkdir(parents=True)
    cfg.write_text('mongo_url = "mongodb://cfg-host:1/cfgdb"\n')
    assert settings.resolve_mongo() == settings.MongoTarget("mongodb://cfg-host:1/cfgdb", "cfgdb", "config")

    monkeypatch.setenv("PQA_MONGO_URL", "mongodb://env-host:2")
    assert settings.resolve_mongo() == settings.MongoTarget("mongodb://env-host:2", "pqa", "env")

    target = settings.resolve_mongo("mongodb://arg-host:3/argdb?authSource=admin")
    assert (target.url, target.db_name, target.source) == ("mongodb://arg-host:3/argdb?authSource=admin", "argdb", "argument")
    assert not target.embedded and settings.resolve_mongo_url(None) == "mongodb://env-host:2"

    # $PQA_CONFIG beats the XDG location; $PQA_DB_PORT moves the embedded default.
    monkeypatch.delenv("PQA_MONGO_URL")
    other = clean_env / "other.toml"
    other.write_text('mongo_url = "mongodb://other:4"\n')
    monkeypatch.setenv("PQA_CONFIG", str(other))
    assert settings.resolve_mongo().url == "mongodb://other:4"
    other.write_text("# no mongo_url\n")
    monkeypatch.setenv("PQA_DB_PORT", "28999")
    assert settings.resolve_mongo() == settings.MongoTarget("mongodb://127.0.0.1:28999/", "pqa", "embedded")


def test_config_and_port_errors_are_usage_errors(clean_env, monkeypatch):
    monkeypatch.setenv("PQA_CONFIG", str(clean_env / "missing.toml"))
    with pytest.raises(UsageError, match="does not exist"):
        settings.resolve_mongo()
    bad = clean_env / "bad.toml"
    bad.write_text("mongo_url = \n")
    monkeypatch.setenv("PQA_CONFIG", str(bad))
    with pytest.raises(UsageError, match="not valid TOML"):
        settings.resolve_mongo()
    bad.write_text("mongo_url = 5\n")
    with pytest.raises(UsageError, match="must be a string"):
        settings.resolve_mongo()
    monkeypatch.setenv("PQA_DB_PORT", "http")
    with pytest.raises(UsageError, match="PQA_DB_PORT"):
        settings.db_port()
    with pytest.raises(UsageError):
        settings.resolve_mongo("   ")


def test_data_dir_follows_pqa_home_then_xdg(clean_env, monkeypatch):
    assert settings.data_dir() == clean_env / "home" / ".local" / "share" / "pqa"
    monkeypatch.setenv("XDG_DATA_HOME", str(clean_env / "xdg"))
    assert settings.data_dir() == clean_env / "xdg" / "pqa"
    monkeypatch.setenv("PQA_HOME", str(clean_env / "pqahome"))
    assert settings.data_dir() == clean_env / "pqahome"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"mongodb://alice:{PASSWORD}@db.example:27017/runs?authSource=admin",
         "mongodb://***:***@db.example:27017/runs?authSource=admin"),
        ("mongodb://alice@h1:1,h2:2/", "mongodb://***@h1:1,h2:2/"),
        ("mongodb://h/?tlsCertificateKeyFilePassword=" + PASSWORD, "mongodb://h/?tlsCertificateKeyFilePassword=***"),
        ("mongodb://plain-host", "mongodb://plain-host"),
        (f"mongodb://alice:pa/{PASSWORD}@h/db", "mongodb://***@h/db"),  # unescaped '/': hide it all
        (f"mongodb://alice:x#{PASSWORD}@h", "mongodb://***@h"),
    ],
)
def test_redact_url(url, shown):
    assert urls.redact_url(url) == shown
    assert PASSWORD not in urls.redact_url(url)


def test_bad_url_is_one_line_usage_error_without_password():
    for url in (f"http://bob:{PASSWORD}@host/", f"bob:{PASSWORD}@host", f"mongodb://bob:pa/{PASSWORD}@h/db", "mongodb://"):
        with pytest.raises(UsageError) as err:
            settings.resolve_mongo(url)
        text = str(err.value)
        assert PASSWORD not in text and "\n" not in text, text
    assert urls.url_secrets(f"mongodb://bob:p%40{PASSWORD}@h/") [1:] == [f"p%40{PASSWORD}", f"p@{PASSWORD}"]
    assert urls.redact_text(f"see https://tok{PASSWORD}@github.com/x and {PASSWORD}", [PASSWORD]) == (
        "see https://***@github.com/x and ***"
    )


# --------------------------------------------------------------------------- reachability


def test_unreachable_url_is_one_clear_line(clean_env):
    url = f"mongodb://bob:{PASSWORD}@127.0.0.1:{free_port()}/?authSource=admin"
    t0 = time.monotonic()
    with pytest.raises(PqaError) as err:
        db.check_reachable(url, timeout=0.5)
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert text.startswith("cannot reach MongoDB at mongodb://***:***@127.0.0.1:"), text
    assert PASSWORD not in text and "\n" not in text and "Topology" not in text


def test_check_reachable_ok_and_wrong_password(embedded_db, mongo_client):
    db.check_reachable(embedded_db, timeout=5)
    user = f"u{os.getpid()}"
    mongo_client.admin.command("createUser", user, pwd="right-password", roles=["root"])
    try:
        port = mongo_client.address[1]
        db.check_reachable(f"mongodb://{user}:right-password@127.0.0.1:{port}/?authSource=admin", timeout=5)
        with pytest.raises(PqaError) as err:
            db.check_reachable(f"mongodb://{user}:{PASSWORD}@127.0.0.1:{port}/?authSource=admin", timeout=5)
        assert "authentication failed" in str(err.value).lower()
        assert PASSWORD not in str(err.value) and "\n" not in str(err.value)
    finally:
        mongo_client.admin.command("dropUser", user)


def test_ensure_database_pings_non_embedded_urls(clean_env, monkeypatch, embedded_db):
    monkeypatch.setenv("PQA_MONGO_URL", embedded_db.rstrip("/") + "/mydb")
    target = db.ensure_database()
    assert (target.source, target.db_name) == ("env", "mydb")
    monkeypatch.setenv("PQA_MONGO_URL", f"mongodb://127.0.0.1:{free_port()}/")
    with pytest.raises(PqaError, match="cannot reach"):
        db.ensure_database(timeout=0.3)


# --------------------------------------------------------------------------- embedded daemon


def test_daemon_start_status_reuse_stop_restart(clean_env, monkeypatch, capsys):
    home = clean_env / "pqa"
    port = free_port()
    assert db.status(home)["running"] is False
    assert db.stop(home) is False

    t0 = time.monotonic()
    url = db.ensure_running(home, port=port)
    startup = time.monotonic() - t0
    assert url == f"mongodb://127.0.0.1:{port}/"
    try:
        st = db.status(home)
        assert st["running"] and st["answering"] and st["port"] == port and st["url"] == url
        assert st["db_dir"] == str(home / "db") and (home / "db" / "data").is_dir()
        pid = st["pid"]
        # A separate, detached process: its own session, not our child.
        assert os.getsid(pid) == pid and os.getsid(pid) != os.getsid(0)
        assert "secantus" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        assert listen_addresses(port) == {"127.0.0.1"}  # loopback only, unless the user asks otherwise

        with pymongo.MongoClient(url, serverSelectionTimeoutMS=3000) as client:
            client.pqa.things.insert_one({"_id": "kept", "v": 1})
            assert client.pqa.things.find_one({"_id": "kept"})["v"] == 1

        t1 = time.monotonic()
        assert db.ensure_running(home) == url  # reused: same pid, and fast
        assert time.monotonic() - t1 < 1.0 and db.status(home)["pid"] == pid
        with pytest.raises(PqaError, match=f"already runs on port {port}"):
            db.ensure_running(home, port=free_port())

        # The embedded default resolves to this server through PQA_HOME/PQA_DB_PORT.
        monkeypatch.setenv("PQA_HOME", str(home))
        monkeypatch.setenv("PQA_DB_PORT", str(port))
        target = db.ensure_database()
        assert target.embedded and target.url == url and target.db_name == "pqa"

        runner = CliRunner()
        out = runner.invoke(db_cli, ["status", "--json"])
        assert out.exit_code == 0 and json.loads(out.output)["pid"] == pid
        out = runner.invoke(db_cli, ["stop"])
        assert out.exit_code == 0 and out.output.strip() == "stopped"
        assert not db._pid_alive(pid) and db.status(home)["running"] is False
        out = runner.invoke(db_cli, ["status"])
        assert out.exit_code == 0 and out.output.startswith("not running")

        # A stale state file (dead pid) is ignored; data survives the restart.
        (home / "db" / db.STATE_FILE).write_text(json.dumps({"pid": pid, "port": port}))
        out = runner.invoke(db_cli, ["start"])
        assert out.exit_code == 0 and out.output.startswith(f"running: {url}"), out.output
        assert db.status(home)["pid"] != pid
        with pymongo.MongoClient(url, serverSelectionTimeoutMS=3000) as client:
            assert client.pqa.things.find_one({"_id": "kept"})["v"] == 1
    finally:
        t2 = time.monotonic()
        stopped = db.stop(home)
        stop_s = time.monotonic() - t2
    assert stopped and db.status(home)["running"] is False
    with capsys.disabled():
        print(f"\n[embedded db] start {startup:.2f}s, stop {stop_s:.2f}s")


def test_daemon_survives_the_command_that_started_it(clean_env):
    """``pqa db start`` returns; the server keeps running in its own session."""
    home, port = clean_env / "pqa", free_port()
    code = f"from pqa_experiments.store import db; print(db.ensure_running({str(home)!r}, port={port}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    try:
        st = db.status(home)
        assert st["running"] and st["answering"] and st["url"] == out.stdout.strip()
    finally:
        assert db.stop(home)


def test_port_taken_by_another_program(clean_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PqaError, match=f"port {port} .* in use"):
            db.ensure_running(clean_env / "pqa", port=port)
    assert db.status(clean_env / "pqa")["running"] is False


def test_daemon_that_dies_at_startup_reports_its_log_tail(clean_env):
    home = clean_env / "pqa"
    (home / "db").mkdir(parents=True)
    (home / "db" / db.CONFIG_FILE).write_text("port = [unclosed\n")  # SecantusDB refuses to start
    t0 = time.monotonic()
    with pytest.raises(PqaError) as err:
        db.ensure_running(home, port=free_port(), timeout=20)
    assert time.monotonic() - t0 < 15  # noticed the exit, did not wait out the timeout
    text = str(err.value)
    assert "exited during startup" in text and "secantusd.log ends with: secantusdb:" in text, text
    assert "\n" not in text
    assert db.status(home)["running"] is False


def test_daemon_that_does_not_answer_in_time_is_stopped(clean_env):
    home = clean_env / "pqa"
    with pytest.raises(PqaError) as err:
        db.ensure_running(home, port=free_port(), timeout=0.01)
    text = str(err.value)
    assert "did not answer" in text and "within 0.01s" in text and "secantusd.log ends with:" in text
    assert db.status(home)["running"] is False and not (home / "db" / db.STATE_FILE).exists()


def test_cli_errors_are_one_line_with_exit_code(clean_env, monkeypatch):
    monkeypatch.setenv("PQA_HOME", str(clean_env / "pqa"))
    monkeypatch.setenv("PQA_DB_PORT", "not-a-port")
    out = CliRunner().invoke(db_cli, ["start"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == ["Error: PQA_DB_PORT must be a port number, got 'not-a-port'"]
    out = CliRunner().invoke(db_cli, ["status", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["running"] is False
