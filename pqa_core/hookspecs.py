"""Plugin hooks. A plugin implements any of these with ``@hookimpl`` and calls
``register(name, factory)`` for each component it adds; ``factory(**kwargs)``
must return an instance of the matching interface in ``pqa_core.interfaces``.
"""
import pluggy

hookspec = pluggy.HookspecMarker("pqa")
hookimpl = pluggy.HookimplMarker("pqa")


@hookspec
def pqa_register_selectors(register):
    """Register selectors: query vectors x doc vectors -> scores."""


@hookspec
def pqa_register_query_encoders(register):
    """Register query encoders: question tokens -> query vectors."""


@hookspec
def pqa_register_projections(register):
    """Register projections: doc latent z -> m soft-prompt embeddings."""


@hookspec
def pqa_register_writers(register):
    """Register writers: a document's text -> the soft-token part of its z (keywords, sentences, an encoder)."""


@hookspec
def pqa_register_retrieval_losses(register):
    """Register retrieval losses: scores + gold mask -> scalar."""


@hookspec
def pqa_register_generation_losses(register):
    """Register generation losses: logits + labels (+ teacher logits) -> scalar."""


@hookspec
def pqa_register_write_objectives(register):
    """Register write objectives: what the write phase trains each document's z for."""


@hookspec
def pqa_register_controls(register):
    """Register controls: baselines that give the LLM passage text (or nothing) instead of latents."""


@hookspec
def pqa_register_commands(cli):
    """Add subcommands to the ``pqa`` click group."""
