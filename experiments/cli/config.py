"""``pqa config``: every config key as ``pqa_core.config`` declares it (type, default, allowed values, help)."""
from __future__ import annotations

import json

import click

from pqa_core.errors import UsageError


@click.command("config")
@click.argument("prefix", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key, for scripts.")
def config(prefix, as_json):
    """List every config key: its type, default, allowed values and what it does.

    \b
    PREFIX narrows the list to one section (read, model.lora, eval.faiss) or key.
    A component's own parameters (selector.temperature, ...) are listed by pqa plugins --verbose.
    \b
    Examples:
      pqa config
      pqa config read
      pqa config --json
    """
    from pqa_core.config import KEYS, did_you_mean

    keys = [key for path, key in KEYS.items() if not prefix or path == prefix or path.startswith(prefix + ".")]
    if not keys:
        sections = {p.rsplit(".", 1)[0] for p in KEYS} | set(KEYS)
        raise UsageError(f"no config key or section {prefix!r}; {did_you_mean(prefix, sections)}"
                         f"sections: {', '.join(sorted({p.split('.')[0] for p in KEYS}))}")
    if as_json:
        for key in keys:
            click.echo(json.dumps({"key": key.path, "type": key.type_name, "default": key.default,
                                   "allowed": key.allowed or None, "help": key.help}))
        return
    for key in keys:
        allowed = f"  ({key.allowed})" if key.allowed else ""
        click.echo(f"{key.path}: {key.type_name} = {json.dumps(key.default)}{allowed}")
        click.echo(f"    {key.help}")
