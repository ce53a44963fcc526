"""The benchmark suite: `python -m bench` (see README, "Performance")."""
