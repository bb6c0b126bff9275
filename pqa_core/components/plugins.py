"""The plugin manager: built-ins and third-party packages register through the same hooks.

Third-party plugins are setuptools entry points of group ``pqa``. The environment variable
``PQA_LOAD_PLUGINS`` narrows them: unset = load all, empty = load none, ``a,b`` = load only the
distributions/entry points named; a name that matches no installed plugin is reported.

A plugin never takes pqa down: one that fails to import, or whose hook raises, is skipped with one
``PluginWarning`` (``failed_plugins`` keeps why, for ``pqa plugins check``).

A component's name means one piece of code. The built-ins register first and keep their names: a
plugin registering a built-in's name (or a command name pqa has) is ignored for that name, with a
warning. A name two third-party plugins register is ambiguous: a config using it is an error naming
both packages, never the first one found. Every component can also be chosen by its qualified name,
``package:name`` (``pqa:cosine``, ``pqa-cosine:cosine``), which always names exactly one. A run
records each component's plugin, package, version and the sha256 of its source module
(``components_of_run``); the resume fingerprint includes them.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import pluggy

from pqa_core import hookspecs
from pqa_core.errors import UsageError
from pqa_core.components.kinds import KIND, KINDS, MODEL_CONTEXT, kinds_for
from pqa_core.components.parameters import accepted_parameters, check_values
from pqa_core.storage.atomic import sha256_file

ENTRY_POINT_GROUP = "pqa"
LOAD_PLUGINS_ENV = "PQA_LOAD_PLUGINS"

DEFAULT_PLUGINS = tuple(kind.builtins for kind in KINDS)
KIND_HOOKS = {kind.name: kind.hook for kind in KINDS}
"""Config section -> the hook that registers components of that kind."""


def new_manager(builtins: bool = True) -> pluggy.PluginManager:
    """A plugin manager with pqa's hooks and, unless told otherwise, its built-ins registered."""
    manager = pluggy.PluginManager("pqa")
    manager.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS if builtins else ():
        manager.register(importlib.import_module(module_name), name=module_name)
    return manager


pm = pluggy.PluginManager("pqa")
pm.add_hookspecs(hookspecs)

_loaded = False
_packages: Dict[str, Tuple[str, Optional[str]]] = {}  # entry-point plugin name -> (distribution, version)
_failed: Dict[str, Dict[str, str]] = {}  # entry point that failed to import -> package, error, traceback
_warned: set = set()


class PluginWarning(UserWarning):
    """A plugin, or one of its registrations, was skipped; pqa goes on without it."""


def warn(message: str) -> None:
    """One ``PluginWarning`` per message and load (``components`` runs often; say it once)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, PluginWarning, stacklevel=3)


def load_plugins() -> None:
    """Register the built-ins, then third-party entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    _warned.clear()
    _failed.clear()
    _distributions.cache_clear()
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_points()


@contextlib.contextmanager
def using(manager: pluggy.PluginManager):
    """Inside the block, components come from ``manager`` (taken as loaded: no entry points are read)
    instead of the process's manager; for tests (``pqa_core.testing``)."""
    global pm, _loaded
    saved = pm, _loaded, dict(_packages), set(_warned)
    pm, _loaded = manager, True
    _warned.clear()
    try:
        yield manager
    finally:
        pm, _loaded = saved[0], saved[1]
        _packages.clear()
        _packages.update(saved[2])
        _warned.clear()
        _warned.update(saved[3])


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _load_entry_points() -> None:
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    allowed = None if wanted is None else {_normalized(n.strip()) for n in wanted.split(",") if n.strip()}
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if allowed is not None:
        _report_load_filter(wanted, allowed, entry_points)
    for ep in entry_points:
        dist_name = ep.dist.name if ep.dist is not None else ep.name
        if allowed is not None and _normalized(dist_name) not in allowed and _normalized(ep.name) not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take pqa down
            _failed[ep.name] = {"package": dist_name, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()}
            warn(f"pqa: plugin {ep.name!r} ({dist_name}) failed to load and was skipped: "
                 f"{type(exc).__name__}: {exc}")
            continue
        _packages[ep.name] = (dist_name, ep.dist.version if ep.dist is not None else None)


def failed_plugins() -> Dict[str, Dict[str, str]]:
    """Entry points that failed to import: name -> {package, error (one line), traceback}."""
    load_plugins()
    return dict(_failed)


def _report_load_filter(wanted: str, allowed: set, entry_points) -> None:
    """Say what ``PQA_LOAD_PLUGINS`` leaves out: names that match no installed plugin, or everything."""
    installed = {_normalized(ep.name) for ep in entry_points}
    installed |= {_normalized(ep.dist.name) for ep in entry_points if ep.dist is not None}
    unmatched = [n.strip() for n in wanted.split(",") if n.strip() and _normalized(n.strip()) not in installed]
    if unmatched:
        names = sorted({ep.name for ep in entry_points} | {ep.dist.name for ep in entry_points if ep.dist})
        warn(f"pqa: {LOAD_PLUGINS_ENV} names {', '.join(repr(n) for n in unmatched)}, which match no installed "
             f"plugin; installed: {', '.join(names) or '(none)'}")
    elif not allowed and entry_points:
        warn(f"pqa: {LOAD_PLUGINS_ENV} is empty: {len(entry_points)} installed third-party plugin entry "
             f"point(s) not loaded")


# --------------------------------------------------------------------------- components


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str

    @property
    def package(self) -> Tuple[Optional[str], Optional[str]]:
        """(distribution, version) that supplied this component, as far as it can be told."""
        return package_of(self.plugin)

    @property
    def builtin(self) -> bool:
        return self.plugin in DEFAULT_PLUGINS

    @property
    def qualified(self) -> str:
        """``package:name`` (the plugin's name when no package is known): names exactly one component."""
        return f"{self.package[0] or self.plugin}:{self.name}"

    def describe(self) -> str:
        """``selector 'cosine' (plugin pqa_plugins.selectors, package pqa 0.1.0)``: for messages."""
        package, version = self.package
        where = f"package {package}{' ' + version if version else ''}" if package else "no installed package"
        return f"{self.kind} {self.name!r} (plugin {self.plugin}, {where})"


def _call_hook(impl, hook_name: str, **kwargs) -> Optional[Exception]:
    """Call one plugin's hook implementation; its exception (if any) is returned, not raised."""
    try:
        impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
    except Exception as exc:  # noqa: BLE001 - a plugin's bug must not take pqa down
        return exc
    return None


def _plugin_name(impl) -> str:
    return pm.get_name(impl.plugin) or repr(impl.plugin)


def registrations(kind: str) -> List[Component]:
    """Every registration of one kind, built-ins first; a plugin whose hook raises is skipped (warned once)."""
    if kind not in KIND_HOOKS:
        raise UsageError(f"unknown component kind {kind!r}; kinds: {', '.join(KIND_HOOKS)}")
    load_plugins()
    found: List[Component] = []
    hook_name = KIND_HOOKS[kind]
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # in registration order
        plugin = _plugin_name(impl)
        mine: Dict[str, Component] = {}

        def register(name, factory, _plugin=plugin, _mine=mine):
            if not isinstance(name, str) or not name or ":" in name or not callable(factory):
                raise TypeError(f"register(name, factory) needs a non-empty name without ':' and a callable, "
                                f"got {name!r}, {factory!r}")
            _mine[name] = Component(kind, name, factory, _plugin)

        error = _call_hook(impl, hook_name, register=register)
        if error is not None:
            warn(f"pqa: plugin {plugin!r} ({_package_text(plugin)}) raised in {hook_name} and was skipped: "
                 f"{type(error).__name__}: {error}")
            continue
        found.extend(mine.values())
    return sorted(found, key=lambda c: not c.builtin)  # stable: the built-ins first, then load order


def components(kind: str) -> Dict[str, Component]:
    """All components of one kind, by the name a config may use. A built-in keeps its name (a plugin's
    registration of it is listed only as ``package:name``); a name two third-party plugins register
    is listed only qualified, each as ``package:name``, and ``lookup`` refuses the plain name."""
    return _table(kind)[0]


def _table(kind: str) -> Tuple[Dict[str, Component], Dict[str, List[Component]]]:
    table: Dict[str, Component] = {}
    clashes: Dict[str, List[Component]] = {}
    for component in registrations(kind):
        name, holder = component.name, table.get(component.name)
        if name in clashes:
            clashes[name].append(component)
            table[component.qualified] = component
        elif holder is None:
            table[name] = component
        elif holder.builtin:
            table[component.qualified] = component
            warn(f"pqa: plugin {component.plugin!r} ({_package_text(component.plugin)}) registers {kind} "
                 f"{name!r}, which pqa has: {kind}.name={name} stays pqa's; choose the plugin's as "
                 f"{kind}.name={component.qualified}, or give it another name")
        else:
            clashes[name] = [table.pop(name), component]
            table[holder.qualified] = holder
            table[component.qualified] = component
    for name, owners in clashes.items():
        warn(f"pqa: {_clash_message(kind, name, owners)}")
    return table, clashes


def _clash_message(kind: str, name: str, owners: List[Component]) -> str:
    packages = " and ".join(f"{_package_text(c.plugin)} (plugin {c.plugin})" for c in owners)
    return (f"{kind} {name!r} is registered by {packages}: choose one as "
            f"{' or '.join(f'{kind}.name={c.qualified}' for c in owners)}, or load only one of the packages "
            f"(e.g. {LOAD_PLUGINS_ENV}={owners[0].package[0] or owners[0].plugin})")


def lookup(kind: str, name: str) -> Component:
    """The one component ``name`` means (plain or ``package:name``); a name two third-party packages
    register, or an unknown one, is a ``UsageError`` saying what to write instead."""
    table, clashes = _table(kind)
    if name in table:
        return table[name]
    if name in clashes:
        raise UsageError(_clash_message(kind, name, clashes[name]))
    if isinstance(name, str) and ":" in name:
        prefix, _, plain = name.partition(":")
        for component in registrations(kind):
            package = component.package[0]
            if component.name == plain and (prefix == component.plugin
                                            or (package and _normalized(prefix) == _normalized(package))):
                return component
    from pqa_core.config import did_you_mean

    available = sorted(table)
    raise UsageError(f"unknown {kind} {name!r}; {did_you_mean(str(name), available)}"
                     f"available: {', '.join(available) or '(none)'}")


def register_commands(cli) -> None:
    """Let plugins add subcommands to the click group ``cli``. A plugin whose hook raises is skipped
    (the commands it added are removed); a command name already taken keeps its first owner."""
    load_plugins()
    for impl in pm.hook.pqa_register_commands.get_hookimpls():
        plugin = _plugin_name(impl)
        before = dict(cli.commands)
        error = _call_hook(impl, "pqa_register_commands", cli=cli)
        if error is not None:
            cli.commands.clear()
            cli.commands.update(before)
            warn(f"pqa: plugin {plugin!r} ({_package_text(plugin)}) raised in pqa_register_commands and was "
                 f"skipped: {type(error).__name__}: {error}")
            continue
        for name, command in list(cli.commands.items()):
            if name in before and before[name] is not command:
                cli.commands[name] = before[name]
                warn(f"pqa: plugin {plugin!r} ({_package_text(plugin)}) adds command {name!r}, which pqa "
                     f"already has: ignored; give it another name")


def validate(kind: str, name: str, kwargs: Optional[Mapping[str, Any]] = None,
             context_names: Optional[Tuple[str, ...]] = None) -> Component:
    """Check a component name, its user kwargs' names and their values against the factory's
    annotations, without building it (cheap, before a run starts)."""
    component = lookup(kind, name)
    context_names = KIND[kind].context if context_names is None else context_names
    params = accepted_parameters(component.factory)
    user_params = sorted(p for p in params if p not in context_names)
    for key in kwargs or {}:
        if key in context_names:
            raise UsageError(f"{kind} {name!r}: parameter {key!r} is set by the model, not the config")
        if key not in params:
            from pqa_core.config import did_you_mean

            raise UsageError(f"{kind} {name!r} got unexpected parameter {key!r}; {did_you_mean(key, user_params)}"
                             f"accepted: {', '.join(user_params) or '(none)'}")
    check_values(f"{kind} {name!r}", component.factory, dict(kwargs or {}))
    return component


def component_defaults(kind: str, name: str) -> Dict[str, Any]:
    """The user-settable parameters of a component and their defaults (for configs to show)."""
    try:
        params = accepted_parameters(lookup(kind, name).factory)
    except UsageError:  # validate says why, with the rest of the section
        return {}
    return {n: p.default for n, p in params.items()
            if n not in KIND[kind].context and p.default is not p.empty
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
    component = validate(kind, name, kwargs, context_names=tuple(context) or KIND[kind].context)
    params = accepted_parameters(component.factory)
    call = {k: v for k, v in context.items() if k in params}
    call.update(kwargs)
    missing = [p for p, spec in params.items() if spec.default is spec.empty and p not in call]
    if missing:
        user_params = sorted(p for p in params if p not in context)
        hint = ""
        if not KIND[kind].context and set(missing) & set(MODEL_CONTEXT):
            hint = (f" ({kind} factories get no model context: only "
                    f"{', '.join(k.name for k in KINDS if k.context)} do)")
        raise UsageError(f"{kind} {name!r} needs parameter(s) {', '.join(missing)}; "
                         f"accepted: {', '.join(user_params) or '(none)'}{hint}")
    return component.factory(**call)


# --------------------------------------------------------------------------- provenance


def package_of(plugin_name: str) -> Tuple[Optional[str], Optional[str]]:
    """(distribution, version) of a registered plugin: its entry point's distribution, pqa for the
    built-ins, else the distribution that installed the plugin's module (None when there is none)."""
    if plugin_name in _packages:
        return _packages[plugin_name]
    plugin = pm.get_plugin(plugin_name)
    module = getattr(plugin, "__name__", None) or getattr(type(plugin), "__module__", "") or ""
    top = module.split(".")[0]
    if top in ("pqa_plugins", "pqa_core", "pqa_experiments"):
        from pqa_core import __version__
        return "pqa", __version__
    for dist in _distributions().get(top, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


@functools.lru_cache(maxsize=1)
def _distributions() -> Mapping[str, List[str]]:
    """Top-level module -> the distributions that install it (read once: it scans every installed one)."""
    return importlib.metadata.packages_distributions()


def _package_text(plugin_name: str) -> str:
    package, version = package_of(plugin_name)
    return f"{package} {version}" if package and version else package or "no installed package"


def provenance(kind: str, name: str) -> Dict[str, Optional[str]]:
    """Which plugin, package, version and source supply component ``name`` of ``kind`` (for run records
    and the resume fingerprint): ``source_sha256`` is the sha256 of the module that defines the factory,
    so an edit to a plugin's code without a version bump still shows."""
    component = lookup(kind, name)
    package, version = component.package
    module = getattr(sys.modules.get(getattr(component.factory, "__module__", ""), None), "__file__", None)
    return {"name": name, "plugin": component.plugin, "package": package, "version": version,
            "module": getattr(component.factory, "__module__", None),
            "source_sha256": sha256_file(module, remember=True) if module and os.path.isfile(module) else None}


def components_of_run(config) -> Dict[str, Dict[str, Optional[str]]]:
    """Kind -> ``provenance`` of each component a run of ``config`` (a ``PQAConfig``) builds."""
    return {kind.name: provenance(kind.name, getattr(config, kind.name)["name"]) for kind in kinds_for(config.phases)}


def plugin_info() -> List[Dict[str, Any]]:
    """One dict per registered plugin: name, package, version, hooks, and the components it registers."""
    load_plugins()
    by_plugin: Dict[str, Dict[str, Any]] = {}

    def entry(name):
        package, version = package_of(name)
        return {"name": name, "package": package, "version": version, "hooks": [], "components": {}}

    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        by_plugin[name] = entry(name)
        by_plugin[name]["hooks"] = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    for kind in KIND_HOOKS:
        for key, comp in components(kind).items():  # key: the name a config uses (package:name when shared)
            by_plugin.setdefault(comp.plugin, entry(comp.plugin))
            by_plugin[comp.plugin]["components"].setdefault(kind, []).append(key)
    return sorted(by_plugin.values(), key=lambda p: (not p["name"].startswith("pqa_plugins."), p["name"]))
