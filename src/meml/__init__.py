"""meml: RL with verifiable rewards for reasoning models (MEML-GRPO, GRPO, Dr.GRPO)."""

__version__ = "0.1.0"
