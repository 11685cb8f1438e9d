"""Offline tooling for the router's weights: load labelled outcomes, fit, evaluate, add a model.

``fit`` (k-means + shrunk per-cluster errors) writes the weights the service serves; ``eval`` measures the
quality-cost trade-off with deferral curves; ``add-model`` appends a model without refitting anything else.
"""
