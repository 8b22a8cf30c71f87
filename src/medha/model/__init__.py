"""Llama-family model: architecture description, layers, loading, tokenizer, sampler.

Importing this package imports no torch: `medha.model.arch` is pure Python so that the cost
model and the scheduler can describe model shapes without a model.
"""
