"""The plugin manager: error messages, in-process plugins, third-party entry points, ``plugin_info``."""
from __future__ import annotations

import warnings

import pytest
import torch

import pqa_core.components.plugins as plugins
from pqa_core.errors import UsageError
from pqa_core.hookspecs import hookimpl
from pqa_core.interfaces import Selector
from pqa_core.components.plugins import build, components, plugin_info, pm

BUILTINS = {
    "selector": ["bilinear", "cosine", "dot", "mlp"],
    "query_encoder": ["llm_mean", "minilm", "transformer"],
    "projection": ["direct", "hybrid", "linear", "mlp2x_gelu"],
    "retrieval_loss": ["gold_nll", "infonce", "margin"],
    "generation_loss": ["ce", "kl_distill"],
}

from conftest import BROKEN_EP, DIST, GOOD_EP


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_available():
    with pytest.raises(UsageError) as info:
        build("selector", "nope")
    message = str(info.value)
    assert "unknown selector 'nope'" in message
    for name in BUILTINS["selector"]:
        assert name in message


def test_unknown_kind():
    with pytest.raises(UsageError, match="unknown component kind 'selectr'"):
        components("selectr")


def test_bad_kwarg_names_component_and_accepted_params():
    with pytest.raises(UsageError) as info:
        build("selector", "cosine", {"temp": 0.1})
    message = str(info.value)
    assert "selector 'cosine'" in message and "'temp'" in message
    assert "accepted: temperature" in message
    with pytest.raises(UsageError) as info:
        build("retrieval_loss", "margin", {"margn": 2})
    assert "retrieval_loss 'margin'" in str(info.value) and "accepted: margin" in str(info.value)
    # context parameters (d_z) are not offered to the user
    with pytest.raises(UsageError) as info:
        build("selector", "mlp", {"hiden": 3}, context={"d_z": 4, "output_dim": 4})
    assert "accepted: hidden" in str(info.value) and "d_z" not in str(info.value).split("accepted:")[1]


def test_model_supplied_parameter_cannot_be_set_by_config():
    with pytest.raises(UsageError, match="'d_z' is set by the model"):
        build("projection", "linear", {"d_z": 3}, context={"d_z": 4, "d_model": 8, "num_tokens": 1})


def test_missing_context_parameter_is_a_usage_error():
    with pytest.raises(UsageError, match=r"projection 'linear' needs parameter\(s\) d_z, d_model, num_tokens"):
        build("projection", "linear")


# --------------------------------------------------------------------------- in-process plugin


class TimesTwoSelector(Selector):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = scale

    def forward(self, query_vectors, doc_vectors):
        return self.scale * (query_vectors @ doc_vectors.T)


class _ObjectPlugin:
    @hookimpl
    def pqa_register_selectors(self, register):
        register("times_two", TimesTwoSelector)


@pytest.fixture
def object_plugin():
    plugins.load_plugins()  # built-ins first, so this registration does not mark the manager loaded early
    pm.register(_ObjectPlugin(), name="test_object_plugin")
    try:
        yield "test_object_plugin"
    finally:
        pm.unregister(name="test_object_plugin")


def test_registered_object_adds_selector(object_plugin):
    assert "times_two" in components("selector")
    assert components("selector")["times_two"].plugin == object_plugin
    sel = build("selector", "times_two", {"scale": 3.0})
    q, z = torch.randn(2, 4), torch.randn(5, 4)
    torch.testing.assert_close(sel(q, z), 3.0 * q @ z.T)
    # built-ins are still there, and plugin_info shows the new plugin
    assert set(BUILTINS["selector"]) <= set(components("selector"))
    info = {p["name"]: p for p in plugin_info()}
    assert info[object_plugin]["components"] == {"selector": ["times_two"]}


def test_unregistered_object_is_gone():
    assert pm.get_plugin("test_object_plugin") is None
    assert "times_two" not in components("selector")


# --------------------------------------------------------------------------- third-party entry points


def _load_recording_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.load_plugins()
    return [str(w.message) for w in caught]


def test_broken_entry_point_warns_and_builtins_still_work(fake_distribution):
    messages = _load_recording_warnings()
    broken = [m for m in messages if BROKEN_EP in m]
    assert len(broken) == 1, messages
    assert DIST in broken[0] and "kaboom from fake plugin" in broken[0]
    # the good plugin of the same distribution loaded; built-ins unaffected
    assert pm.get_plugin(GOOD_EP) is not None and pm.get_plugin(BROKEN_EP) is None
    assert "third_party" in components("selector")
    for kind, names in BUILTINS.items():
        assert set(names) <= set(components(kind)), kind
    assert build("selector", "dot")(torch.ones(1, 2), torch.ones(3, 2)).tolist() == [[2.0, 2.0, 2.0]]


def test_empty_load_plugins_env_stops_third_party_loading(fake_distribution, monkeypatch):
    monkeypatch.setenv(plugins.LOAD_PLUGINS_ENV, "")
    messages = _load_recording_warnings()
    assert not any(BROKEN_EP in m for m in messages), messages
    assert pm.get_plugin(GOOD_EP) is None
    assert "third_party" not in components("selector")
    assert set(BUILTINS["selector"]) <= set(components("selector"))


def test_load_plugins_env_selects_by_entry_point_name(fake_distribution, monkeypatch):
    monkeypatch.setenv(plugins.LOAD_PLUGINS_ENV, GOOD_EP)
    messages = _load_recording_warnings()
    assert not any(BROKEN_EP in m for m in messages), messages
    assert "third_party" in components("selector")


def test_fake_entry_points_gone_after_fixture():
    assert pm.get_plugin(GOOD_EP) is None
    assert "third_party" not in components("selector")
    assert plugins._loaded is True


# --------------------------------------------------------------------------- plugin_info


def test_plugin_info_lists_every_builtin():
    info = plugin_info()
    listed = {}
    for plugin in info:
        for kind, names in plugin["components"].items():
            listed.setdefault(kind, set()).update(names)
    for kind, names in BUILTINS.items():
        assert set(names) <= listed.get(kind, set()), kind
    builtin = [p for p in info if p["name"].startswith("pqa_plugins.")]
    assert {p["name"] for p in builtin} == set(plugins.DEFAULT_PLUGINS)
    assert all(p["version"] for p in builtin)
    assert all(p["hooks"] for p in builtin)
