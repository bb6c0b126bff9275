"""The model: the LLM, MiniLM, the doc table, the ParametricQA module, its builder and top-k selection."""
