"""The inference service: the model, its engine, sampling, stop sequences, streamed text."""
