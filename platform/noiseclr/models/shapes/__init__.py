"""The embedded shapes model's own parts: architecture (SD classes, small), tokenizer (the world's
words), training recipe and model card, and its quality bar measured with the oracle."""
