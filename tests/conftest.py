"""Shared fixtures and helpers: one real SecantusDB daemon per test session (never a mock), free ports,
listening addresses, a fake third-party plugin distribution."""
from __future__ import annotations

import contextlib
import socket
import textwrap

import pytest


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen_addresses(port: int) -> set:
    """Local addresses in LISTEN state on ``port``, from /proc/net/tcp{,6} (what ``ss -ltn`` reads)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:
                    continue
                raw = bytes.fromhex(addr_hex)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, raw))
    return found


@pytest.fixture(scope="module")
def one_torch_thread():
    """The models in tests are tiny: intra-op threads only add OpenMP contention on a busy machine.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_db(tmp_path_factory):
    """URL of a SecantusDB daemon started by ``pqa_experiments.store.db`` in a tmp data dir.

    Session-scoped because a start costs ~1 s; stopped (and checked gone) at the end.
    Tests isolate themselves by database name.
    """
    from pqa_experiments.store import db

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


# --------------------------------------------------------------------------- a fake third-party plugin

BROKEN_EP = "pqa_test_broken_ep"
GOOD_EP = "pqa_test_good_ep"
DIST = "pqa-test-fake-plugin"


def write_distribution(root, dist: str, version: str, entry_points: dict, modules: dict) -> None:
    """An installed-looking distribution in folder ``root`` (on ``sys.path`` or ``PYTHONPATH`` it is
    what pip would have installed): the ``modules`` (name -> source) and a dist-info declaring the
    ``entry_points`` (name -> module) of group ``pqa``."""
    from pathlib import Path

    root = Path(root)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(
        "[pqa]\n" + "".join(f"{name} = {module}\n" for name, module in entry_points.items()))


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """``install(dist, version, entry_points, modules)`` puts a distribution on ``sys.path`` (folder
    ``tmp_path/site``) for pqa to load as it loads pip-installed plugins.

    Resets ``pqa_core.components.plugins._loaded`` so the entry points are read again, and afterwards
    unregisters whatever the test loaded and restores the flag and ``PQA_LOAD_PLUGINS``.
    """
    import sys

    import pqa_core.components.plugins as plugins
    from pqa_core.components.plugins import pm

    plugins.load_plugins()  # make sure the built-ins are registered before the snapshot
    before = {pm.get_name(p) for p in pm.get_plugins()}
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.LOAD_PLUGINS_ENV, raising=False)
    monkeypatch.setattr(plugins, "_loaded", False)  # monkeypatch restores the original value
    monkeypatch.setattr(plugins, "_packages", dict(plugins._packages))
    written = []

    def install(dist, version, entry_points, modules):
        write_distribution(site, dist, version, entry_points, modules)
        written.extend(modules)
        plugins._distributions.cache_clear()
        return site

    try:
        yield install
    finally:
        for plugin in list(pm.get_plugins()):
            name = pm.get_name(plugin)
            if name not in before:
                pm.unregister(name=name)
        for module in written:
            sys.modules.pop(module, None)
        plugins._distributions.cache_clear()


@pytest.fixture
def fake_distribution(installed_plugins):
    """A distribution with two ``pqa`` entry points: one whose module raises on import, one that
    registers selector ``third_party``."""
    return installed_plugins(DIST, "0.1", {BROKEN_EP: "pqa_test_broken_mod", GOOD_EP: "pqa_test_good_mod"}, {
        "pqa_test_broken_mod": 'raise RuntimeError("kaboom from fake plugin")\n',
        "pqa_test_good_mod": """
            from pqa_core.hookspecs import hookimpl
            from pqa_core.interfaces import Selector

            class ThirdPartySelector(Selector):
                def forward(self, query_vectors, doc_vectors):
                    return -(query_vectors @ doc_vectors.T)

            @hookimpl
            def pqa_register_selectors(register):
                register("third_party", ThirdPartySelector)
        """,
    })


def refused(result, code: int, *parts: str) -> str:
    """Exit ``code``, one ``Error:`` line holding each of ``parts`` as the last line of output, no traceback."""
    text = result.output
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert result.exit_code == code, text[-3000:]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]
