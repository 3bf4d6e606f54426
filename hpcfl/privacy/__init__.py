"""Privacy: gradient-inversion attacks on what clients upload, and the metrics of leakage."""
