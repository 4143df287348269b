"""The benchmark matrix: configs (expanded into cells), the measurement of one cell or
group, the worker processes and the runner."""
