"""pqa_plugins: the built-in components, registered through the same hooks a third-party plugin uses.

One module per component kind (``pqa_core.components.kinds.KINDS`` names each kind's module). Each holds
component classes (``torch.nn.Module`` subclasses of the interfaces in ``pqa_core.interfaces``; a
control is a plain object) whose ``__init__`` keyword arguments are their config, declared with their
ranges and help (``Annotated[float, Range(...), "help"]``), and one ``@hookimpl`` function that
registers them by name. ``pqa plugins --verbose`` lists them all with their parameters.

Constructor parameters named like the model context (``pqa_core.components.kinds.MODEL_CONTEXT``: ``d_z``,
``d_model``, ``num_tokens``, ``llm`` ...) are supplied by the model to selectors, query encoders,
projections and writers (see ``pqa_core.components.plugins.build``); all others are user config.
"""
