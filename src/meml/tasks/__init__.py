"""Layer 1: tasks, their verifiers and reward functions, experts and stage-1 traces.

Tasks (tasks/registry.py): built-in procedural arithmetic, the benchmark loaders (GSM8K,
MathQA, StrategyQA), users' own data ("generic") and reasoning-gym ("gym"); docs/DATA.md
describes each format, split and verifier."""
