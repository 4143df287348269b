"""attnbench plugin: Coordinate Attention (``coordatt``), found through the
``attnbench.modules`` entry point once this package is installed."""
