"""Model files: the family registry, detection, loading, checkpoint/VAE registries, hashes, safe weight reading."""
