"""``r4b bench``: decode, prefill and load speed against transformers and the bandwidth limit."""
