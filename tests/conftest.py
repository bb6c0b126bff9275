"""Shared database fixtures: one real SecantusDB daemon per test session (never a mock)."""
from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_db(tmp_path_factory):
    """URL of a SecantusDB daemon started by ``pqa_experiments.db`` in a tmp data dir.

    Session-scoped because a start costs ~1 s; stopped (and checked gone) at the end.
    Tests isolate themselves by database name.
    """
    from pqa_experiments import db

    data_dir = tmp_path_factory.mktemp("pqa_home")
    url = db.ensure_running(data_dir=data_dir, port=free_port())
    yield url
    db.stop(data_dir=data_dir)
    assert not db.status(data_dir=data_dir)["running"]


@pytest.fixture
def mongo_client(embedded_db):
    """A pymongo client on ``embedded_db``, closed after the test."""
    import pymongo

    client = pymongo.MongoClient(embedded_db, serverSelectionTimeoutMS=5000)
    yield client
    client.close()
