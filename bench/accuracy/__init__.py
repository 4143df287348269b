"""Accuracy: offline data, training, checkpoints, test-resolution robustness, the demo."""
