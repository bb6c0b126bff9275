"""Components by name: the kinds table, the plugin manager, parameter declarations, the contract check."""
