"""fewshot_runner: a config-driven experiment runner for few-shot meta-learning."""

__version__ = "0.1.0"
