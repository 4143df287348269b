"""The benchmark matrix: configs, the measurement of one cell or group, the runner."""
