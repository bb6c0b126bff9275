"""A plugin's parameters are declared where they are written (issue 18, item 2): ``Annotated[float,
Range(...), "help"]``; ``pqa run``'s pre-flight, ``print_config``, ``pqa plugins check`` and the build
check a value alike, a typo'd name gets "did you mean", and ``pqa plugins --verbose`` shows the help."""
from __future__ import annotations

from typing import Annotated

import pytest
import torch
from click.testing import CliRunner

from pqa_core.components import plugins
from pqa_core.components.contract import ContractError, check_component
from pqa_core.components.parameters import declarations
from pqa_core.components.plugins import build, pm, validate
from pqa_core.errors import UsageError
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Range, Selector


class ScaledSelector(Selector):
    """q·z times a scale."""

    def __init__(self, scale: Annotated[float, Range(0, 10), "multiplies every score"] = 2.0,
                 shift: Annotated[int, "added to every score"] = 0):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, query_vectors, doc_vectors):
        return self.scale * (query_vectors @ doc_vectors.T) + self.shift


class BadDefaultSelector(ScaledSelector):
    """Its default breaks its own declaration."""

    def __init__(self, scale: Annotated[float, Range(1), "at least one"] = 0.5):
        super().__init__(scale)


class _Plugin:
    @hookimpl
    def pqa_register_selectors(self, register):
        register("scaled_test", ScaledSelector)
        register("bad_default_test", BadDefaultSelector)


@pytest.fixture
def declared_plugin():
    plugins.load_plugins()
    pm.register(_Plugin(), name="test_declared_plugin")
    try:
        yield
    finally:
        pm.unregister(name="test_declared_plugin")


def test_declarations_are_read_from_the_annotations():
    found = declarations(ScaledSelector)
    assert found["scale"].range == Range(0, 10) and found["scale"].help == "multiplies every score"
    assert found["shift"].range is None and found["shift"].help == "added to every score"


def test_a_value_outside_a_declared_range_is_refused_before_building(declared_plugin):
    with pytest.raises(UsageError, match=r"selector 'scaled_test': parameter 'scale' = 20: must be a finite "
                                         r"number in \[0, 10\]"):
        validate("selector", "scaled_test", {"scale": 20})
    with pytest.raises(UsageError, match="parameter 'scale' must be float, got 'x'"):
        build("selector", "scaled_test", {"scale": "x"})
    assert build("selector", "scaled_test", {"scale": 3}).scale == 3
    with pytest.raises(UsageError, match="selector 'cosine': parameter 'temperature' = -1: must be a finite number > 0"):
        validate("selector", "cosine", {"temperature": -1})


def test_a_typo_in_a_parameter_name_gets_did_you_mean(declared_plugin):
    with pytest.raises(UsageError, match="got unexpected parameter 'scal'; did you mean 'scale'\\? accepted: scale, shift"):
        validate("selector", "scaled_test", {"scal": 1.0})
    with pytest.raises(UsageError, match="did you mean 'temperature'"):
        validate("selector", "cosine", {"temprature": 0.1})


def test_the_contract_check_refuses_a_default_outside_its_declaration(declared_plugin):
    with pytest.raises(ContractError, match="parameter 'scale' = 0.5: must be a finite number >= 1 \\(its default\\)"):
        check_component("selector", "bad_default_test", {}, context={"d_z": 4, "output_dim": 4})
    assert check_component("selector", "scaled_test", {}, context={"d_z": 4, "output_dim": 4}) is not None


def test_print_config_refuses_a_plugin_parameter_outside_its_range(tmp_path, monkeypatch):
    from pqa_experiments.cli.main import cli

    monkeypatch.setenv("PQA_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["run", "pipeline", "print_config", "with", "smoke", "selector.temperature=-1"])
    assert result.exit_code == 2, result.output
    assert ("Error: selector 'cosine': parameter 'temperature' = -1: must be a finite number > 0"
            in result.output.splitlines())


def test_plugins_check_refuses_a_param_outside_its_range():
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "check", "cosine", "-p", "temperature=-1"])
    assert result.exit_code == 1 and "parameter 'temperature' = -1: must be a finite number > 0" in result.output


def test_plugins_verbose_lists_each_parameter_with_its_range_and_help(declared_plugin):
    from pqa_experiments.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "--verbose"])
    assert result.exit_code == 0, result.output
    assert ("  selector scaled_test: q·z times a scale.\n"
            "      scale: float, default 2.0, a finite number in [0, 10]\n"
            "          multiplies every score\n"
            "      shift: int, default 0\n"
            "          added to every score\n") in result.output
    assert "      temperature: float, default 0.05, a finite number > 0\n" in result.output
    q, z = torch.randn(2, 3), torch.randn(4, 3)
    torch.testing.assert_close(build("selector", "scaled_test", {}).forward(q, z), 2.0 * q @ z.T)
