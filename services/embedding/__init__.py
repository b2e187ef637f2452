"""The embedding service: an embedding model of the catalogue (all-MiniLM-L6-v2), its own replica kind."""
