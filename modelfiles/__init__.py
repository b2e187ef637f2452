"""The models' files, a library: the catalogue (deploy/models.toml), each source found and converted once."""
