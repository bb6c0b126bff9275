"""Test helpers for plugin authors (installed with pqa; ``pqa plugin new`` writes a test that uses them).

::

    import my_plugin
    from pqa_core.testing import check_plugin, plugin_registered

    def test_my_selector_keeps_the_contract():
        with plugin_registered(my_plugin):
            check_plugin("selector", "my_selector", {"temperature": 2.0})

``check_plugin`` is the check ``pqa run`` makes before a run exists and ``pqa plugins check`` makes on
demand; ``tiny_model_context`` is what the model would give a factory, on the tiny random Llama.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Mapping, Optional

from pqa_core.components import plugins
from pqa_core.components.contract import ContractError, check_component, check_in_default_run

__all__ = ["ContractError", "check_component", "check_plugin", "plugin_registered", "tiny_model_context"]


@contextlib.contextmanager
def plugin_registered(plugin: Any, name: Optional[str] = None):
    """Inside the block, pqa's components are its built-ins and those of ``plugin`` (a module or an
    object with ``@hookimpl`` methods) only: no other installed plugin is loaded. Yields the manager."""
    manager = plugins.new_manager()
    manager.register(plugin, name=name or getattr(plugin, "__name__", None) or type(plugin).__name__)
    with plugins.using(manager):
        yield manager


def check_plugin(kind: str, name: str, params: Optional[Mapping[str, Any]] = None, llm: str = "tiny"):
    """Build component ``name`` of ``kind`` with ``params`` as a run would (on a stand-in of ``llm``) and
    call it once on small inputs; returns it built. ``ContractError`` says what is wrong."""
    return check_in_default_run(kind, name, params, llm=llm)


def tiny_model_context(d_z: int = 384, num_tokens: int = 2) -> Dict[str, Any]:
    """The model context a writer's factory gets on the tiny random Llama (``llm``, ``d_model``,
    ``vocab_size``, ``tokenizer`` ...); a projection gets the same less the writer-only names, a query
    encoder and a selector that, sized to the retrieval key."""
    from pqa_core.modeling.builder import model_context
    from pqa_core.config import PQAConfig
    from pqa_core.modeling.llm import load_llm_stand_in

    config = PQAConfig.from_dict({"model": {"llm": "tiny", "d_z": d_z, "num_memory_tokens": num_tokens}})
    return model_context(config, *load_llm_stand_in("tiny"))
