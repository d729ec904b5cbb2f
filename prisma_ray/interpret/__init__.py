"""Interpretation: top activations, heatmaps, dashboards, auto-interpretation, steering."""
