"""Evaluation: the MNIST evaluator network, the metrics in its feature space, distributed scoring."""
