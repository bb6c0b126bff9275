"""``pqa plugins``: list the installed plugins and their components, check them, start a new one.

``pqa plugins [--verbose] [--json]`` lists; ``pqa plugins check [NAME ...]`` runs the contract check
``pqa run`` makes before a run exists (exit 1 when a component fails it); ``pqa plugins new NAME``
(also ``pqa plugin new NAME``) writes a plugin package skeleton.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Dict, List

import click

from pqa_core.errors import UsageError
from pqa_core.components.kinds import KIND


def component_details(kind: str, component) -> Dict[str, Any]:
    """What ``--verbose`` shows of one component: its docstring's first line, its parameters (name,
    type, default) and the model context it takes."""
    from pqa_core.components.parameters import (accepted_parameters, declarations, expected_types, first_doc_line,
                                                type_name)

    params = accepted_parameters(component.factory)
    types, declared = expected_types(component.factory), declarations(component.factory)
    context = KIND[kind].context

    def allowed(name):
        found = declared.get(name)
        return found.range.describe("int" if types.get(name) is int else "float") if found and found.range else None

    return {
        "doc": first_doc_line(component.factory),
        "parameters": [{"name": n, "type": type_name(types.get(n, p.empty)),
                        "default": None if p.default is p.empty else p.default, "required": p.default is p.empty,
                        "allowed": allowed(n), "help": declared[n].help if n in declared else None}
                       for n, p in params.items() if n not in context],
        "model_context": [n for n in params if n in context],
    }


@click.group("plugins", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.option("-v", "--verbose", is_flag=True,
              help="Also each component's summary and parameters (type, default, allowed values, help).")
@click.pass_context
def plugins(ctx, as_json, verbose):
    """List installed plugins and the components each registers.

    \b
    Examples:
      pqa plugins --verbose
      pqa plugins check                 # the contract check of every component
      pqa plugins check my_selector     # one component (or plugin, or package)
      pqa plugins new pqa-my-selector --kind selector
    """
    if ctx.invoked_subcommand is not None:
        return
    from pqa_core.components.plugins import components, plugin_info

    info = plugin_info()
    if verbose:
        for plugin in info:
            plugin["component_details"] = {
                kind: {name: component_details(kind, components(kind)[name]) for name in sorted(names)}
                for kind, names in plugin["components"].items()}
    if as_json:
        click.echo(json.dumps(info, indent=2, default=repr))
        return
    for plugin in info:
        package = f" ({plugin['package']}{' ' + plugin['version'] if plugin['version'] else ''})" \
            if plugin.get("package") else ""
        click.echo(f"{plugin['name']}{package}")
        for kind, names in sorted(plugin["components"].items()):
            if not verbose:
                click.echo(f"  {kind}: {', '.join(sorted(names))}")
                continue
            for name, details in plugin["component_details"][kind].items():
                click.echo(f"  {kind} {name}: {details['doc'] or '(no docstring)'}")
                for param in details["parameters"]:
                    default = "required" if param["required"] else f"default {param['default']!r}"
                    allowed = f", {param['allowed']}" if param["allowed"] else ""
                    click.echo(f"      {param['name']}: {param['type']}, {default}{allowed}")
                    if param["help"]:
                        click.echo(f"          {param['help']}")
                if details["model_context"]:
                    click.echo(f"      from the model: {', '.join(details['model_context'])}")


def _matching(names) -> List[tuple]:
    """(kind, config name, component) of the components whose name, qualified name, plugin or package is
    one of ``names`` (all when empty). A name that is a plugin which failed to import is said so."""
    from pqa_core.components.plugins import KIND_HOOKS, components, failed_plugins

    found, used = [], set()
    for kind in KIND_HOOKS:
        for key, component in components(kind).items():
            keys = {key, component.name, component.qualified, component.plugin, component.package[0]}
            hit = keys & set(names)
            if not names or hit:
                found.append((kind, key, component))
                used |= hit
    failed = failed_plugins()
    used |= {n for n in names for plugin, why in failed.items() if n in (plugin, why["package"])}
    unknown = [n for n in names if n not in used]
    if unknown:
        raise UsageError(f"no component, plugin or package named {', '.join(repr(n) for n in unknown)}; "
                         f"see pqa plugins")
    return found


def _parse_params(items) -> Dict[str, Any]:
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --param {item!r}: expected key=value")
        try:
            params[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            params[key] = text  # as Sacred reads an unquoted word: a string
    return params


@plugins.command("check")
@click.argument("names", nargs=-1)
@click.option("--llm", default="tiny", show_default=True,
              help="Check against this model's sizes and tokenizer (a stand-in: no weights are loaded).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter for the checked component(s), as in `with kind.KEY=VALUE`. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON: one object per component.")
def check(names, llm, params, as_json):
    """Build each component (or those named: component, plugin or package names) and call it once on
    small inputs, as `pqa run` does before a run exists. Exit 1 if any breaks its contract, or if a
    plugin failed to import (pqa --debug plugins check: its traceback)."""
    from pqa_core.components.contract import check_in_default_run
    from pqa_core.modeling.llm import load_llm_stand_in

    from pqa_core.components.plugins import failed_plugins

    chosen = _matching(names)
    values = _parse_params(params)
    model = load_llm_stand_in(llm)
    debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
    results = []
    for plugin, why in failed_plugins().items():  # a plugin that did not import registers nothing to check
        if names and not {plugin, why["package"]} & set(names):
            continue
        results.append({"kind": None, "name": None, "plugin": plugin, "package": why["package"], "version": None,
                        "ok": False, "error": f"plugin {plugin!r} ({why['package']}) failed to import: "
                                              f"{why['error']}"})
        if not as_json:
            click.echo(f"FAIL  {results[-1]['error']}")
            if debug:
                click.echo(why["traceback"].rstrip())
    for kind, key, component in chosen:
        package, version = component.package
        result = {"kind": kind, "name": key, "plugin": component.plugin, "package": package,
                  "version": version, "ok": True, "error": None}
        try:
            check_in_default_run(kind, key, values, llm=llm, llm_and_tokenizer=model)
        except UsageError as exc:
            result.update(ok=False, error=str(exc))
        results.append(result)
        if not as_json:
            click.echo(f"ok    {component.describe()}" if result["ok"] else f"FAIL  {result['error']}")
    if as_json:
        click.echo(json.dumps(results, indent=2))
    failed = sum(not r["ok"] for r in results)
    if failed:
        if not as_json:
            click.echo(f"{failed} of {len(results)} component(s) or plugin(s) failed", err=True)
        raise SystemExit(1)


@plugins.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KIND)), default="selector", show_default=True,
              help="The kind of the component the package starts with.")
@click.option("--dir", "parent", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where to create the package folder NAME.")
def new(name, kind, parent):
    """Write a plugin package NAME: pyproject.toml with the pqa entry point, one working component of
    KIND, and a test running pqa's contract check on it."""
    from pqa_experiments.cli.plugin_skeleton import write_skeleton

    target = write_skeleton(name, kind, Path(parent))
    click.echo(f"wrote {target}")
    click.echo(f"next: pip install -e {target} && pqa plugins check {name} && pytest {target}/tests")
