"""The plugin manager: built-ins and third-party packages register through the same hooks.

Third-party plugins are setuptools entry points of group ``pqa``. The
environment variable ``PQA_LOAD_PLUGINS`` narrows them: unset = load all,
empty = load none, ``a,b`` = load only the distributions/entry points named.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import pluggy

from . import hookspecs
from .errors import UsageError

ENTRY_POINT_GROUP = "pqa"
LOAD_PLUGINS_ENV = "PQA_LOAD_PLUGINS"

DEFAULT_PLUGINS = (
    "pqa_plugins.selectors",
    "pqa_plugins.query_encoders",
    "pqa_plugins.projections",
    "pqa_plugins.retrieval_losses",
    "pqa_plugins.generation_losses",
    "pqa_plugins.write_objectives",
    "pqa_plugins.controls",
)

# config namespace -> hook that registers components of that kind
KIND_HOOKS = {
    "selector": "pqa_register_selectors",
    "query_encoder": "pqa_register_query_encoders",
    "projection": "pqa_register_projections",
    "retrieval_loss": "pqa_register_retrieval_losses",
    "generation_loss": "pqa_register_generation_losses",
    "write_objective": "pqa_register_write_objectives",
    "control": "pqa_register_controls",
}

pm = pluggy.PluginManager("pqa")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> None:
    """Register the built-ins, then third-party entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_points()


def _load_entry_points() -> None:
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist is not None else ep.name
        if allowed is not None and dist_name not in allowed and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take pqa down
            warnings.warn(f"pqa: plugin {ep.name!r} ({dist_name}) failed to load and was skipped: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)
            continue
        pm.register(plugin, name=ep.name)


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


def components(kind: str) -> Dict[str, Component]:
    """All components of one kind, by name. Later registrations of a name win (plugins may override)."""
    if kind not in KIND_HOOKS:
        raise UsageError(f"unknown component kind {kind!r}; kinds: {', '.join(KIND_HOOKS)}")
    load_plugins()
    found: Dict[str, Component] = {}
    hook_name = KIND_HOOKS[kind]
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(name, factory, _plugin=plugin_name):
            found[name] = Component(kind, name, factory, _plugin)

        impl.function(register=register)
    return found


def accepted_parameters(factory: Callable[..., Any]) -> Dict[str, inspect.Parameter]:
    params = inspect.signature(factory).parameters
    return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


MODEL_CONTEXT = ("d_z", "output_dim", "d_model", "num_tokens", "llm", "vocab_size", "embedding_std",
                 "pad_token_id", "input_std")
"""Names the model supplies to factories that declare them; a config may not set these."""


def validate(kind: str, name: str, kwargs: Optional[Mapping[str, Any]] = None,
             context_names=MODEL_CONTEXT) -> Component:
    """Check a component name and its user kwargs without building it (cheap, before a run starts)."""
    available = components(kind)
    if name not in available:
        raise UsageError(f"unknown {kind} {name!r}; available: {', '.join(sorted(available)) or '(none)'}")
    component = available[name]
    params = accepted_parameters(component.factory)
    user_params = sorted(p for p in params if p not in context_names)
    for key in kwargs or {}:
        if key in context_names:
            raise UsageError(f"{kind} {name!r}: parameter {key!r} is set by the model, not the config")
        if key not in params:
            raise UsageError(f"{kind} {name!r} got unexpected parameter {key!r}; "
                             f"accepted: {', '.join(user_params) or '(none)'}")
    return component


def component_defaults(kind: str, name: str) -> Dict[str, Any]:
    """The user-settable parameters of a component and their defaults (for configs to show)."""
    available = components(kind)
    if name not in available:
        return {}
    params = accepted_parameters(available[name].factory)
    return {n: p.default for n, p in params.items()
            if n not in MODEL_CONTEXT and p.default is not inspect.Parameter.empty
            and isinstance(p.default, (int, float, str, bool, type(None)))}


def with_component_defaults(kind: str, section: Mapping[str, Any]) -> Dict[str, Any]:
    """``section`` with the chosen component's defaults filled in; explicit values win."""
    return {**component_defaults(kind, section.get("name")), **section}


def build(kind: str, name: str, kwargs: Optional[Mapping[str, Any]] = None,
          context: Optional[Mapping[str, Any]] = None):
    """Build component ``name`` of ``kind`` from user ``kwargs``.

    ``context`` holds values the model supplies (``d_z``, ``d_model``, ``llm`` ...);
    each is passed only to factories that declare a parameter of that name.
    """
    kwargs = dict(kwargs or {})
    context = dict(context or {})
    component = validate(kind, name, kwargs, context_names=tuple(context) or MODEL_CONTEXT)
    params = accepted_parameters(component.factory)
    call = {k: v for k, v in context.items() if k in params}
    call.update(kwargs)
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in call]
    if missing:
        user_params = sorted(p for p in params if p not in context)
        raise UsageError(f"{kind} {name!r} needs parameter(s) {', '.join(missing)}; "
                         f"accepted: {', '.join(user_params) or '(none)'}")
    return component.factory(**call)


def plugin_info():
    """One dict per registered plugin: name, version, hooks, and the components it registers."""
    load_plugins()
    by_plugin: Dict[str, Dict[str, Any]] = {}
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        by_plugin[name] = {"name": name, "hooks": hooks, "version": _version_of(plugin), "components": {}}
    for kind in KIND_HOOKS:
        for comp in components(kind).values():
            by_plugin.setdefault(comp.plugin, {"name": comp.plugin, "hooks": [], "version": None,
                                               "components": {}})
            by_plugin[comp.plugin]["components"].setdefault(kind, []).append(comp.name)
    return sorted(by_plugin.values(), key=lambda p: (not p["name"].startswith("pqa_plugins."), p["name"]))


def _version_of(plugin) -> Optional[str]:
    module = getattr(plugin, "__name__", "") or ""
    top = module.split(".")[0]
    if top in ("pqa_plugins", "pqa_core"):
        from . import __version__
        return __version__
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None
