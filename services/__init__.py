"""The four internal services of the mesh, one package each, plus the model files."""
