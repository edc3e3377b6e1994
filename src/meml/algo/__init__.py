"""Layer 1: the algorithm as pure functions: advantages, loss terms, the objective, IML and
HSFT selection. Tensors and records in, tensors and records out; no model, no I/O."""
