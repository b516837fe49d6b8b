"""Interpretability tools: image-token regions, attention maps and the logit lens (indices.py: the layer and
position arguments they share)."""
