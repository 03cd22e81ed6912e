"""Training: the loop (`trainer`), the EMA of the generator and the metric window it logs."""
