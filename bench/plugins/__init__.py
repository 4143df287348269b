"""Plugins: loading user modules (files, dotted names, entry points) and the conformance kit."""
