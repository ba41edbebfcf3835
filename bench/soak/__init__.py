"""Soak benchmark: the lab under churn and faults (bench/soak/bench.py)."""
