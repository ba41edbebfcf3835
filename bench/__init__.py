"""Benchmarks. They take the machine lock the namespaced tests take, so a benchmark never
measures a test run and a test run never meets a benchmark's namespaces."""

from plexus.lab.ops import hold_machine_lock

hold_machine_lock()
