"""Model loading, LoRA, model-family facts and checkpoints: one path for train, eval, predict, serve."""
