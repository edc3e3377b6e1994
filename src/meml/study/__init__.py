"""`meml compare`: studies of arms x seeds x learning rates with paired statistics."""
