"""Inputs: image processing, chat template, conversations, prompt rendering, the tokenizer and the processor."""
