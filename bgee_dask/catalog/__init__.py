"""Layer 4, catalog: the atlas's tables of experiments, runs and genes, their commits, locks and checks."""
