"""`make bench`: latency and throughput of the mesh, measured against baselines in one run."""
