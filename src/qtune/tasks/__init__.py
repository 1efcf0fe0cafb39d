"""One module per task: how its records become tensors, a loss and predictions."""
