"""Layer 2: models and generation: loading (hub, local, GGUF), the rollout engines
(transformers, vLLM) behind one factory, weight sync."""
