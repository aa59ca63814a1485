"""evomerge: evolutionary merge search for language models (Optuna proposes, workers merge in place and
score with lm-eval, the winner is exported as a Hugging Face model)."""

__version__ = "0.1.0"
