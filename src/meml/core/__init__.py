"""Layer 0: the records that flow through meml, the config, its validation, shared errors.

Nothing here imports torch models or any other meml package."""
