"""Data: tokenizer and chat format, sources, pretraining packing, dialogs, preferences."""
