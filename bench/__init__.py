"""attnbench harness: profilers, matrix runner, results store, reports, command line."""
