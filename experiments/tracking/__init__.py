"""Sacred: the experiments, the bridge from a Sacred run to the core pipeline, config files after with."""
