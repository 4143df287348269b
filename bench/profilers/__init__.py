"""Profilers: parameters, FLOPs, speed, memory and the environment of a measurement."""
