"""A third-party plugin package's mistakes, caught before a run exists: wrong shapes, a vector loss, bad
parameter values, names taken, hooks that raise, ``PQA_LOAD_PLUGINS`` typos. And what a plugin author
gets: ``pqa plugins check``/``--verbose``, ``pqa_core.testing``, ``pqa plugin new``.

The broken plugins are installed the way pip installs them (a distribution with ``pqa`` entry
points on the path), in-process for most checks and through the real ``pqa`` command where the
command line is what is tested.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pqa_core.components.plugins as plugins
from pqa_core.config import PQAConfig
from pqa_core.components.contract import ContractError, check_config_components
from pqa_core.errors import UsageError
from pqa_core.components.kinds import KIND, KINDS
from pqa_core.modeling.llm import load_llm_stand_in
from pqa_core.components.plugins import PluginWarning, components, register_commands
from pqa_core.testing import check_plugin, plugin_registered, tiny_model_context

from conftest import write_distribution

REPO = Path(__file__).resolve().parents[1]

BROKEN_DIST, BROKEN_EP = "pqa-broken-parts", "pqa_broken_parts"
BROKEN = {BROKEN_EP: """
    import torch
    from torch import nn
    from pqa_core.hookspecs import hookimpl
    from pqa_core.interfaces import Projection, RetrievalLoss, Selector, WriteObjective

    class FlatProjection(Projection):
        '''One embedding per document: [..., d_model], not [..., num_tokens, d_model].'''
        def __init__(self, d_z: int, d_model: int, num_tokens: int):
            super().__init__()
            self.num_tokens = num_tokens
            self.proj = nn.Linear(d_z, d_model)

        def forward(self, z):
            return self.proj(z)

    class TransposedSelector(Selector):
        '''Scores [N, B] instead of [B, N].'''
        def forward(self, query_vectors, doc_vectors):
            return doc_vectors @ query_vectors.T

    class VectorLoss(RetrievalLoss):
        '''One loss per question, never reduced.'''
        def forward(self, scores, gold_mask):
            return -(scores.log_softmax(-1) * gold_mask).sum(-1)

    class RankedSelector(Selector):
        '''Dot product, kept only for the first ``rank`` ... (a parameter with a type).'''
        def __init__(self, rank: int = 1, scale=1.0, mode="dot"):
            super().__init__()
            self.rank, self.scale, self.mode = rank, scale, mode

        def forward(self, query_vectors, doc_vectors):
            scores = query_vectors @ doc_vectors.T
            return scores * self.scale if self.rank < 1000 else scores

    class ExplodingSelector(Selector):
        def forward(self, query_vectors, doc_vectors):
            raise RuntimeError("boom")

    class EveryRowObjective(WriteObjective):
        '''Pulls every document's z, not only the batch's.'''
        def forward(self, model, rows):
            return model.soft_prompts(rows[:, None]).pow(2).mean() + model.doc_vectors.pow(2).mean()

    @hookimpl
    def pqa_register_write_objectives(register):
        register("every_row", EveryRowObjective)

    @hookimpl
    def pqa_register_projections(register):
        register("flat", FlatProjection)

    @hookimpl
    def pqa_register_selectors(register):
        register("transposed", TransposedSelector)
        register("ranked", RankedSelector)
        register("exploding", ExplodingSelector)

    @hookimpl
    def pqa_register_retrieval_losses(register):
        register("vector", VectorLoss)
"""}

CLASH_DIST, CLASH_EP = "pqa-name-clash", "pqa_name_clash"
CLASH = {CLASH_EP: """
    import click
    from pqa_core.hookspecs import hookimpl
    from pqa_core.interfaces import Selector

    class NotCosine(Selector):
        def forward(self, query_vectors, doc_vectors):
            return -(query_vectors @ doc_vectors.T)

    @hookimpl
    def pqa_register_selectors(register):
        register("cosine", NotCosine)
        register("not_cosine", NotCosine)

    @hookimpl
    def pqa_register_commands(cli):
        @cli.command("run")
        def run():
            click.echo("hijacked")

        @cli.command("hello")
        def hello():
            click.echo("hello from a plugin")
"""}

RAISING_DIST, RAISING_EP = "pqa-raising-hooks", "pqa_raising_hooks"
RAISING = {RAISING_EP: """
    import click
    from pqa_core.hookspecs import hookimpl

    @hookimpl
    def pqa_register_commands(cli):
        @cli.command("half-added")
        def half_added():
            pass
        raise RuntimeError("commands hook is broken")

    @hookimpl
    def pqa_register_selectors(register):
        raise RuntimeError("selectors hook is broken")
"""}


def install(installed_plugins, dist, version, modules):
    return installed_plugins(dist, version, {name: name for name in modules}, modules)


def plugin_warnings(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def smoke_config(**sections) -> PQAConfig:
    return PQAConfig.from_dict({"model": {"llm": "tiny", "num_memory_tokens": 2}, **sections})


@pytest.fixture(scope="module")
def tiny():
    return load_llm_stand_in("tiny")


# --------------------------------------------------------------------------- the kinds table


def test_every_kind_has_a_hook_a_config_section_and_builtins():
    hooks = {name for name in dir(plugins.hookspecs) if name.startswith("pqa_register_")}
    assert hooks == {kind.hook for kind in KINDS} | {"pqa_register_commands"}
    defaults = PQAConfig()
    for kind in KINDS:
        assert getattr(defaults, kind.name) == {"name": kind.default}, kind.name
        assert kind.default in components(kind.name), kind.name
        module = importlib.import_module(kind.builtins)
        assert hasattr(module, kind.hook), kind.name
        assert {c.plugin for c in components(kind.name).values()} >= {kind.builtins}
    assert plugins.DEFAULT_PLUGINS == tuple(kind.builtins for kind in KINDS)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("section, message", [
    ({"projection": {"name": "flat"}},
     "projection 'flat' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) breaks its contract: "
     "projection(z [2, 3, 384]) returned shape (2, 3, 64), expected (2, 3, 2, 64) = [..., num_tokens, d_model]"),
    ({"selector": {"name": "transposed"}},
     "selector 'transposed' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) breaks its contract: "
     "selector(query_vectors [2, 384], doc_vectors [5, 384]) returned shape (5, 2), expected (2, 5) = [B, N]"),
    ({"retrieval_loss": {"name": "vector"}},
     "retrieval_loss 'vector' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) breaks its contract: "
     "retrieval_loss(scores [2, 5], gold_mask [2, 5]) returned shape (2,), expected a scalar (shape ())"),
    ({"write_objective": {"name": "every_row"}},
     "write_objective 'every_row' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) breaks its contract: "
     "write_objective(model, rows [0, 2]) moves the z of rows 1 and 3, which are not in the batch"),
    ({"selector": {"name": "exploding"}},
     "selector 'exploding' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) raised RuntimeError: boom when "
     "called on small inputs"),
    ({"selector": {"name": "ranked", "rank": "abc"}},
     "selector 'ranked': parameter 'rank' must be int, got 'abc' (str)"),
    ({"selector": {"name": "ranked", "rank": 2.5}}, "selector 'ranked': parameter 'rank' must be int, got 2.5 (float)"),
    ({"selector": {"name": "ranked", "rank": True}}, "selector 'ranked': parameter 'rank' must be int, got True"),
    ({"selector": {"name": "ranked", "scale": "big"}},  # unannotated: the default's type
     "selector 'ranked': parameter 'scale' must be float, got 'big' (str)"),
])
def test_broken_component_is_one_usage_error_naming_it(installed_plugins, tiny, section, message):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    with pytest.raises(UsageError) as info:
        check_config_components(smoke_config(**section), tiny)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_good_values_pass_and_the_check_leaves_every_random_generator_as_it_was(installed_plugins, tiny):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    config = smoke_config(selector={"name": "ranked", "rank": 2, "scale": 2, "mode": "dot"})
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    check_config_components(config, tiny)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    torch.manual_seed(1)
    check_config_components(config, tiny)
    torch.testing.assert_close(torch.rand(3), expected[0])


def test_a_loss_declaring_model_context_is_told_losses_get_none(tiny):
    class SmoothedLoss(KIND["generation_loss"].interface):
        def __init__(self, vocab_size: int):
            super().__init__()

    class Plugin:
        @plugins.hookspecs.hookimpl
        def pqa_register_generation_losses(self, register):
            register("smoothed", SmoothedLoss)

    with plugin_registered(Plugin(), name="smoothing_plugin"):
        with pytest.raises(ContractError, match=r"needs parameter\(s\) vocab_size; .*generation_loss factories get "
                                                r"no model context: only selector, query_encoder, projection, writer do"):
            check_config_components(smoke_config(generation_loss={"name": "smoothed"}), tiny)


# --------------------------------------------------------------------------- names, hooks, PQA_LOAD_PLUGINS


def test_a_plugin_registering_a_taken_name_is_ignored_with_one_warning(installed_plugins):
    install(installed_plugins, CLASH_DIST, "1.0", CLASH)
    found, messages = plugin_warnings(lambda: (components("selector"), components("selector")))
    assert found[0]["cosine"].plugin == "pqa_plugins.selectors"
    assert found[0]["not_cosine"].plugin == CLASH_EP
    clash = [m for m in messages if "'cosine'" in m]
    assert clash == [f"pqa: plugin '{CLASH_EP}' ({CLASH_DIST} 1.0) registers selector 'cosine', which pqa has: "
                     f"selector.name=cosine stays pqa's; choose the plugin's as selector.name={CLASH_DIST}:cosine, "
                     f"or give it another name"]
    assert found[0][f"{CLASH_DIST}:cosine"].plugin == CLASH_EP  # the qualified name always picks it


def test_a_raising_component_hook_is_skipped_with_one_warning(installed_plugins):
    install(installed_plugins, RAISING_DIST, "0.2", RAISING)
    found, messages = plugin_warnings(lambda: components("selector"))
    assert {"cosine", "dot", "mlp", "bilinear"} <= set(found)
    assert [m for m in messages if "selectors hook is broken" in m] == [
        f"pqa: plugin '{RAISING_EP}' ({RAISING_DIST} 0.2) raised in pqa_register_selectors and was skipped: "
        f"RuntimeError: selectors hook is broken"]


def test_plugin_commands_never_replace_builtins_and_a_raising_hook_adds_nothing(installed_plugins):
    install(installed_plugins, CLASH_DIST, "1.0", CLASH)
    install(installed_plugins, RAISING_DIST, "0.2", RAISING)

    @click.group()
    def cli():
        pass

    @cli.command("run")
    def builtin_run():
        click.echo("the built-in run")

    _, messages = plugin_warnings(lambda: register_commands(cli))
    assert set(cli.commands) == {"run", "hello"}  # no "half-added" from the hook that raised
    result = CliRunner().invoke(cli, ["run"])
    assert result.output == "the built-in run\n"
    assert CliRunner().invoke(cli, ["hello"]).output == "hello from a plugin\n"
    assert f"pqa: plugin '{CLASH_EP}' ({CLASH_DIST} 1.0) adds command 'run', which pqa already has: ignored; " \
           "give it another name" in messages
    assert any(m.startswith(f"pqa: plugin '{RAISING_EP}' ({RAISING_DIST} 0.2) raised in pqa_register_commands and "
                            "was skipped: RuntimeError: commands hook is broken") for m in messages)


@pytest.mark.parametrize("value, expected", [
    ("pqa-broken-part", "pqa: PQA_LOAD_PLUGINS names 'pqa-broken-part', which match no installed plugin; "
                        "installed: pqa-broken-parts, pqa_broken_parts"),
    ("pqa_broken_parts,myplugin", "pqa: PQA_LOAD_PLUGINS names 'myplugin', which match no installed plugin"),
    ("", "pqa: PQA_LOAD_PLUGINS is empty: 1 installed third-party plugin entry point(s) not loaded"),
])
def test_load_plugins_env_reports_what_it_leaves_out(installed_plugins, monkeypatch, value, expected):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    monkeypatch.setenv(plugins.LOAD_PLUGINS_ENV, value)
    found, messages = plugin_warnings(lambda: components("selector"))
    assert any(m.startswith(expected) for m in messages), messages
    assert ("transposed" in found) == ("pqa_broken_parts" in value)


def test_load_plugins_env_matching_names_is_silent(installed_plugins, monkeypatch):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    monkeypatch.setenv(plugins.LOAD_PLUGINS_ENV, "PQA_Broken.Parts")  # distribution names are normalised
    found, messages = plugin_warnings(lambda: components("selector"))
    assert "transposed" in found and not messages


# --------------------------------------------------------------------------- provenance


def test_components_of_a_run_name_their_plugin_package_version_and_source(installed_plugins):
    site = install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    used = plugins.components_of_run(smoke_config(selector={"name": "ranked"}))
    assert set(used) == {"selector", "query_encoder", "projection", "writer", "retrieval_loss", "generation_loss",
                         "write_objective"}
    assert "write_objective" not in plugins.components_of_run(smoke_config(phases=["read", "eval"]))
    source = hashlib.sha256((site / f"{BROKEN_EP}.py").read_bytes()).hexdigest()
    assert used["selector"] == {"name": "ranked", "plugin": BROKEN_EP, "package": BROKEN_DIST, "version": "0.3",
                                "module": BROKEN_EP, "source_sha256": source}
    assert used["projection"]["package"] == "pqa" and used["projection"]["version"]
    assert "control" in plugins.components_of_run(PQAConfig.from_dict({"phases": ["control"]}))


# --------------------------------------------------------------------------- for plugin authors


def test_testing_helpers_register_one_plugin_in_a_clean_manager(installed_plugins, tiny):
    site = install(installed_plugins, CLASH_DIST, "1.0", CLASH)
    assert "not_cosine" in components("selector")
    (site / "author_plugin.py").write_text(textwrap.dedent(BROKEN[BROKEN_EP]))  # importable, not installed
    module = importlib.import_module("author_plugin")
    try:
        with plugin_registered(module):
            assert "not_cosine" not in components("selector")  # other installed plugins are left out
            assert components("projection")["flat"].plugin == "author_plugin"
            with pytest.raises(ContractError, match=r"projection 'flat' .* breaks its contract"):
                check_plugin("projection", "flat")
            assert check_plugin("selector", "ranked", {"rank": 3}).rank == 3
        assert "flat" not in components("projection") and "not_cosine" in components("selector")
    finally:
        sys.modules.pop("author_plugin", None)
    context = tiny_model_context(d_z=16, num_tokens=3)
    assert context["d_z"] == context["output_dim"] == 16 and context["num_tokens"] == 3
    assert context["d_model"] == 64 and context["vocab_size"] == len(tiny[1])
    assert set(context) == set(KIND["writer"].context) > set(KIND["projection"].context)


@pytest.mark.parametrize("kind", [kind.name for kind in KINDS])
def test_new_plugin_skeleton_passes_its_own_test(tmp_path, kind):
    from pqa_experiments.cli.plugin_skeleton import write_skeleton

    folder = write_skeleton(f"pqa-my-{kind.replace('_', '-')}", kind, tmp_path)
    module_name = f"pqa_my_{kind}"
    assert f'{module_name} = "{module_name}"' in (folder / "pyproject.toml").read_text()
    sys.path.insert(0, str(folder))
    try:
        test_module = importlib.import_module(f"test_{module_name}")
    except ImportError:
        sys.path.insert(0, str(folder / "tests"))
        test_module = importlib.import_module(f"test_{module_name}")
    try:
        getattr(test_module, f"test_my_{kind}_keeps_the_pqa_contract")()
    finally:
        for name in (module_name, f"test_{module_name}"):
            sys.modules.pop(name, None)
        sys.path[:] = [p for p in sys.path if not p.startswith(str(folder))]


def test_new_plugin_refuses_an_existing_folder_and_a_bad_name(tmp_path):
    from pqa_experiments.cli.plugin_skeleton import write_skeleton

    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        write_skeleton("taken", "selector", tmp_path)
    with pytest.raises(UsageError, match="plugin name '9lives'"):
        write_skeleton("9lives", "selector", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_plugins_verbose_lists_parameters_types_defaults_and_summary(installed_plugins):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    from pqa_experiments.cli.main import cli

    text = CliRunner().invoke(cli, ["plugins", "--verbose"]).output
    assert "pqa_broken_parts (pqa-broken-parts 0.3)" in text
    assert "  selector ranked: Dot product, kept only for the first ``rank`` ... (a parameter with a type)." in text
    assert "      rank: int, default 1\n      scale: float, default 1.0\n      mode: str, default 'dot'\n" in text
    assert "  projection flat: One embedding per document" in text
    assert "      from the model: d_z, d_model, num_tokens" in text
    listing = json.loads(CliRunner().invoke(cli, ["plugins", "--json", "--verbose"]).output)
    broken = next(p for p in listing if p["name"] == BROKEN_EP)
    assert broken["package"] == BROKEN_DIST and broken["version"] == "0.3"
    assert broken["component_details"]["selector"]["ranked"]["parameters"][0] == {
        "name": "rank", "type": "int", "default": 1, "required": False, "allowed": None, "help": None}


def test_plugins_check_reports_each_component_and_fails_on_a_broken_one(installed_plugins):
    install(installed_plugins, BROKEN_DIST, "0.3", BROKEN)
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "check", BROKEN_DIST, "cosine"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "ok    selector 'cosine' (plugin pqa_plugins.selectors, package pqa 0.1.0)" in lines
    assert "ok    selector 'ranked' (plugin pqa_broken_parts, package pqa-broken-parts 0.3)" in lines
    assert any(line.startswith("FAIL  projection 'flat' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) "
                               "breaks its contract") for line in lines)
    assert len(lines) == 7 and result.stderr == "5 of 7 component(s) or plugin(s) failed\n"
    ok = CliRunner().invoke(cli, ["plugin", "check", "ranked", "-p", "rank=4", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)[0]["ok"] is True
    bad = CliRunner().invoke(cli, ["plugin", "check", "ranked", "-p", "rank=abc", "--json"])
    assert bad.exit_code == 1 and "parameter 'rank' must be int" in json.loads(bad.output)[0]["error"]
    unknown = CliRunner().invoke(cli, ["plugin", "check", "nope"])
    assert unknown.exit_code == 2 and "no component, plugin or package named 'nope'" in unknown.output


# --------------------------------------------------------------------------- the real command line


def pqa(*args, env=None, timeout=600):
    full = dict(os.environ, PQA_PROGRESS="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", "pqa_experiments.cli.main", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=str(REPO))


def test_installed_broken_projection_stops_pqa_run_before_the_run_exists(tmp_path, embedded_db, mongo_client):
    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, BROKEN_DIST, "0.3", {BROKEN_EP: BROKEN_EP}, BROKEN)
    name = f"pqa_contract_{uuid.uuid4().hex[:8]}"
    outputs = tmp_path / "outputs"
    proc = pqa("run", "pipeline", "--mongo-url", f"{embedded_db.rstrip('/')}/{name}", "with", "smoke",
               "projection.name=flat", env={"PYTHONPATH": str(site), "PQA_OUTPUT_DIR": str(outputs)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "Error: projection 'flat' (plugin pqa_broken_parts, package pqa-broken-parts 0.3) breaks its contract: "
        "projection(z [2, 3, 384]) returned shape (2, 3, 64), expected (2, 3, 2, 64) = [..., num_tokens, d_model]"]
    assert mongo_client[name].runs.count_documents({}) == 0 and not outputs.exists()


def test_raising_and_clashing_plugin_hooks_leave_every_command_usable(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_distribution(site, CLASH_DIST, "1.0", {CLASH_EP: CLASH_EP}, CLASH)
    write_distribution(site, RAISING_DIST, "0.2", {RAISING_EP: RAISING_EP}, RAISING)
    env = {"PYTHONPATH": str(site)}
    top = pqa("--help", env=env)
    assert top.returncode == 0, top.stderr
    assert "hello" in top.stdout and "run" in top.stdout and "Traceback" not in top.stderr
    assert sorted(top.stderr.splitlines()) == [
        f"Warning: plugin '{CLASH_EP}' ({CLASH_DIST} 1.0) adds command 'run', which pqa already has: ignored; "
        "give it another name",
        f"Warning: plugin '{RAISING_EP}' ({RAISING_DIST} 0.2) raised in pqa_register_commands and was skipped: "
        "RuntimeError: commands hook is broken"]
    assert "Run a Sacred experiment" in pqa("run", "--help", env=env).stdout
    assert pqa("db", "--help", env=env).returncode == 0
    assert pqa("hello", env=env).stdout == "hello from a plugin\n"


def test_readme_documents_every_context_parameter_and_every_kind():
    from pqa_core.components.kinds import CONTEXT_DOCS

    readme = (REPO / "README.md").read_text()
    assert set(CONTEXT_DOCS) == {name for kind in KINDS for name in kind.context}
    for name, meaning in CONTEXT_DOCS.items():
        assert f"| `{name}` | {meaning} |" in readme, name
    for kind in KINDS:
        assert f"| `{kind.name}` | `{kind.hook}` |" in readme, kind.name


def test_pqa_plugin_new_writes_a_package_pip_installs_and_pqa_checks(tmp_path):
    made = pqa("plugin", "new", "pqa-my-selector", "--kind", "selector", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[0] == f"wrote {tmp_path / 'pqa-my-selector'}"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(tmp_path / "pqa-my-selector")], check=True, capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(site)}
    checked = pqa("plugins", "check", "pqa-my-selector", env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == ("ok    selector 'my_selector' (plugin pqa_my_selector, package pqa-my-selector "
                              "0.1.0)\n")
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "pqa-my-selector" / "tests")], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(site)), timeout=600, cwd=str(tmp_path))
    assert tested.returncode == 0 and "1 passed" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.parametrize("name, message", [
    ("numpy", "a module 'numpy' is already importable here, and the plugin's package would replace it once "
              "installed; choose another name (such as pqa_numpy)"),
    ("torch", "a module 'torch' is already importable here"),
    ("os", "a module 'os' is already importable here"),
    ("pqa-core", "a module 'pqa_core' is already importable here"),
    ("import", "'import' is a Python keyword, so `import import` cannot work"),
    ("class", "'class' is a Python keyword"),
])
def test_pqa_plugin_new_refuses_a_name_that_shadows_a_module_or_is_a_keyword(tmp_path, name, message):
    """Issue 19: ``pqa plugin new numpy`` wrote a package that replaces numpy once installed as suggested;
    ``pqa plugin new import`` wrote ``import import``. One line, exit 2, nothing written."""
    from click.testing import CliRunner

    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugin", "new", name, "--kind", "selector", "--dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: plugin name {name!r}: ") and message in last, result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_the_stand_in_has_the_llms_depth_so_a_depth_shaped_component_has_the_runs_tensors():
    """The pre-flight's stand-in of SmolLM2 has its 30 layers (each its own module and layer_idx, all over
    the first layer's tensors): an encoder writer of 4 layers holds there the tensors it holds on the real
    LLM, so a resumed run's checkpoint is compared with the right names (a one-layer stand-in refused it)."""
    from pqa_core.components.contract import check_config_components, model_tensor_names
    from pqa_core.config import PQAConfig
    from pqa_core.modeling.llm import load_llm
    from plugins.writers import EncoderWriter

    stand_in, tokenizer = load_llm_stand_in("smollm2-135m")
    real, _ = load_llm("smollm2-135m")
    layers = stand_in.get_decoder().layers
    assert len(layers) == real.config.num_hidden_layers == stand_in.config.num_hidden_layers == 30
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(30))
    assert layers[29].mlp.up_proj.weight.data_ptr() == layers[0].mlp.up_proj.weight.data_ptr()  # one layer's memory
    ids = torch.tensor([[1, 2, 3]])
    assert stand_in.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)  # the KV cache works
    names = lambda llm: set(EncoderWriter(llm, 576, 4, 0.02, 0, layers=4, tokenizer=tokenizer).state_dict())  # noqa: E731
    assert names(stand_in) == names(real) and "adapters.15.lora_B.weight" in names(real)
    config = PQAConfig.from_dict({"model": {"llm": "smollm2-135m"}, "writer": {"name": "encoder", "layers": 4}})
    assert "writer.adapters.15.lora_B.weight" in model_tensor_names(check_config_components(config, (stand_in, tokenizer)))
