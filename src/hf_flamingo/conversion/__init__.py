"""Converters from other checkpoint layouts to hf_flamingo / transformers layouts."""
