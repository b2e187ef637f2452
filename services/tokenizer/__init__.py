"""The tokenizer service: the model's own tokenizer and chat template."""
