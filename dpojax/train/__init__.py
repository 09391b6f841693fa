"""Training: the pure steps, metric writers and the loop."""
