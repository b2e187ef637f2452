"""The tokenizer service: each served model's own tokenizer and chat template."""
