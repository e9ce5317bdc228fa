"""seap: training-free pruning of LLM feed-forward experts (SEAP, GRIFFIN and baselines)."""

__version__ = "0.1.0"
