"""A component's identity is exact (issue 18, item 3): one name never means two pieces of code silently.

Two third-party packages registering one name are an error naming both, with the way out (a
qualified ``package:name``, or ``PQA_LOAD_PLUGINS``); the resume fingerprint holds each component's
source hash, so a run resumed after its plugin's code changed is refused; ``pqa plugins check`` names
a plugin that failed to import; ``pqa plugin new`` refuses a name that is taken."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

import pqa_core.components.plugins as plugins
from pqa_core.config import PQAConfig
from pqa_core.errors import CheckpointError, UsageError

from conftest import BROKEN_EP, DIST

SELECTOR = """
    from pqa_core.hookspecs import hookimpl
    from pqa_core.interfaces import Selector

    class ScaledCos(Selector):
        \"\"\"Dot product times {scale}.\"\"\"

        def forward(self, query_vectors, doc_vectors):
            return {scale} * (query_vectors @ doc_vectors.T)

        def embed_queries(self, query_vectors):
            return {scale} * query_vectors

        def embed_documents(self, doc_vectors):
            return doc_vectors

    @hookimpl
    def pqa_register_selectors(register):
        register("scaledcos", ScaledCos)
"""


def install_selector(installed_plugins, dist: str, scale: float):
    module = dist.replace("-", "_")
    return installed_plugins(dist, "0.1", {module: module}, {module: SELECTOR.format(scale=scale)})


@pytest.fixture
def two_packages(installed_plugins):
    install_selector(installed_plugins, "pqa-scaled-a", 2.0)
    return install_selector(installed_plugins, "pqa-scaled-b", 3.0)


def _quiet(fn):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [str(w.message) for w in caught]


def test_two_packages_registering_one_name_is_an_error_naming_both(two_packages):
    with pytest.raises(UsageError) as error:
        _quiet(lambda: plugins.validate("selector", "scaledcos"))
    message = str(error.value)
    assert message.startswith("selector 'scaledcos' is registered by pqa-scaled-a 0.1 (plugin pqa_scaled_a) and "
                              "pqa-scaled-b 0.1 (plugin pqa_scaled_b): choose one as "
                              "selector.name=pqa-scaled-a:scaledcos or selector.name=pqa-scaled-b:scaledcos")
    assert "PQA_LOAD_PLUGINS=pqa-scaled-a" in message
    with pytest.raises(UsageError, match="is registered by pqa-scaled-a"):  # the run's pre-flight says the same
        _quiet(lambda: plugins.components_of_run(PQAConfig.from_dict({"selector": {"name": "scaledcos"}})))


def test_a_qualified_name_picks_one_package(two_packages):
    a, _ = _quiet(lambda: plugins.build("selector", "pqa-scaled-a:scaledcos"))
    b, _ = _quiet(lambda: plugins.build("selector", "pqa_scaled_b:scaledcos"))  # the package's spelling as a module
    assert type(a).__module__ == "pqa_scaled_a" and type(b).__module__ == "pqa_scaled_b"
    used, _ = _quiet(lambda: plugins.components_of_run(PQAConfig.from_dict({"selector": {"name": "pqa-scaled-b:scaledcos"}})))
    assert used["selector"]["package"] == "pqa-scaled-b" and len(used["selector"]["source_sha256"]) == 64
    assert plugins.lookup("selector", "pqa:cosine").plugin == "pqa_plugins.selectors"


def test_load_plugins_env_is_the_other_way_out(installed_plugins, monkeypatch):
    install_selector(installed_plugins, "pqa-scaled-a", 2.0)
    install_selector(installed_plugins, "pqa-scaled-b", 3.0)
    monkeypatch.setenv(plugins.LOAD_PLUGINS_ENV, "pqa-scaled-b")
    component, _ = _quiet(lambda: plugins.validate("selector", "scaledcos"))
    assert component.package[0] == "pqa-scaled-b"


def test_plugins_check_of_either_package_checks_its_component(two_packages):
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "check", "pqa-scaled-b", "--json"])
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout[result.stdout.index("["):])
    assert [(r["name"], r["package"], r["ok"]) for r in checked] == [("pqa-scaled-b:scaledcos", "pqa-scaled-b", True)]


def test_a_run_resumed_after_its_plugin_source_changed_is_refused(installed_plugins, tmp_path):
    from pqa_core.pipeline import check_output_dir, fingerprint_of

    site = install_selector(installed_plugins, "pqa-scaled-a", 2.0)
    config = PQAConfig.from_dict({"model": {"llm": "tiny"}, "selector": {"name": "scaledcos"},
                                  "resume": str(tmp_path / "run")})
    before = fingerprint_of(config)
    assert before["values"]["components.selector.package"] == "pqa-scaled-a"
    checkpoint = tmp_path / "run" / "checkpoints" / "write" / "final"
    checkpoint.mkdir(parents=True)
    (checkpoint / "MANIFEST.json").write_text(json.dumps({"files": {}, "fingerprint": before}))
    assert check_output_dir(config, fingerprint_of(config), tmp_path / "run") == []  # same code: resumes

    source = site / "pqa_scaled_a.py"
    time.sleep(0.01)
    source.write_text(source.read_text().replace("2.0", "2.5"))  # the same name and version, other code
    after = fingerprint_of(config)
    with pytest.raises(CheckpointError, match=r"was made under another configuration: "
                                              r"components\.selector\.source_sha256="):
        check_output_dir(config, after, tmp_path / "run")
    forced = PQAConfig.from_dict({**config.to_dict(), "force_resume": True})
    recorded = check_output_dir(forced, fingerprint_of(forced), tmp_path / "run")
    assert len(recorded) == 1 and "components.selector.source_sha256=" in recorded[0]


def test_plugins_check_names_a_plugin_that_failed_to_import(fake_distribution):
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "check", BROKEN_EP])
    assert result.exit_code == 1
    assert (f"FAIL  plugin '{BROKEN_EP}' ({DIST}) failed to import: RuntimeError: kaboom from fake plugin"
            in result.stdout.splitlines())
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(cli, ["--debug", "plugins", "check", DIST])
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.stdout
    assert 'raise RuntimeError("kaboom from fake plugin")' in debug.stdout


def test_plugin_new_refuses_a_component_name_that_is_taken(tmp_path):
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugin", "new", "pqa-cosine", "--kind", "selector", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert ("Error: selector 'cosine' is taken by selector 'cosine' (plugin pqa_plugins.selectors, package pqa "
            in result.output)
    assert not (tmp_path / "pqa-cosine").exists()
    ok = CliRunner().invoke(cli, ["plugin", "new", "pqa-cosine2", "--kind", "selector", "--dir", str(tmp_path)])
    assert ok.exit_code == 0 and (tmp_path / "pqa-cosine2").is_dir()
