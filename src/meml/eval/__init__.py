"""Layer 3: held-out evaluation under each expert and its maths (pass@k, coverage, voting,
the paired statistics of studies)."""
