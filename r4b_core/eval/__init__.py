"""``r4b eval``: local benchmark files (VLMEvalKit TSV, JSONL), batched generation per thinking mode, per-mode reports."""
