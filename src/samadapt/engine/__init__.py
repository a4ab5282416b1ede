"""The experiment engine every task shares: typed configs, the Task contract, one run lifecycle, one sweep engine,
one predict path and one CLI flag vocabulary (see docs/ARCHITECTURE.md)."""
