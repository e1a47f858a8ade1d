"""polar-sparsity: contextual-sparsity LLM inference (Polar Sparsity, NeurIPS 2025)."""

__version__ = "0.1.0"
