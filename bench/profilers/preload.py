"""Imports the FLOP counters' libraries ahead of the measurements, quietly.

The runner's forkserver imports this module once (:data:`attnbench.matrix.worker._PRELOAD`)
so that workers forked from it start with fvcore and ptflops loaded; fvcore's import calls
``torch.jit.script``, which torch 2.10+ answers with a FutureWarning that would otherwise be
printed once per run. Missing libraries are skipped (the counters say so when used).
"""
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        pass
    try:
        import ptflops  # noqa: F401
    except ImportError:
        pass
