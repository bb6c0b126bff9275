"""Storage: checkpoints, atomic files, safetensors helpers, fingerprints, the output folder's lock."""
