"""pqa_plugins: the built-in components, registered through the same hooks a third-party plugin uses.

Each module holds component classes (``torch.nn.Module`` subclasses of the
interfaces in ``pqa_core.interfaces``; ``__init__`` keyword arguments are their
config) and one ``@hookimpl`` function that registers them by name:

- ``selectors``: ``dot``, ``cosine``, ``bilinear``, ``mlp``
- ``query_encoders``: ``llm_mean``, ``minilm``, ``transformer``
- ``projections``: ``linear``, ``mlp2x_gelu``, ``direct``, ``hybrid``
- ``writers``: ``keywords``, ``encoder``
- ``write_objectives``: ``reconstruct``, ``distill``, ``weighted``
- ``retrieval_losses``: ``gold_nll``, ``infonce``, ``margin``
- ``generation_losses``: ``ce``, ``kl_distill``
- ``controls`` (baselines, plain objects, not modules): ``closed_book``, ``random_docs``, ``oracle``,
  ``bm25``, ``dense_minilm``

Constructor parameters named like the model context (``pqa_core.components.kinds.MODEL_CONTEXT``: ``d_z``,
``d_model``, ``num_tokens``, ``llm`` ...) are supplied by the model to selectors, query encoders,
projections and writers (see ``pqa_core.components.plugins.build``); all others are user config.
"""
