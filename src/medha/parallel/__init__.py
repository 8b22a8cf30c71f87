"""Distributed execution: rank layout, process groups, tensor-parallel pieces, the KVP merge,
worker processes and their launch. Modules that need torch import it themselves; `layout` does
not, so the rank arithmetic is usable anywhere."""
