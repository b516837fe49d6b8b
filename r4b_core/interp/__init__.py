"""Interpretability tools: image-token regions, attention maps and the logit lens."""
