"""Layer 4: training: forward passes, the update, one RL step, stage 1, the loop,
checkpoints, logging."""
