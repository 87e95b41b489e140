"""egp-export: compile depth-reduced (entropy-guided pruned) PyTorch networks."""

__version__ = "0.1.0"
