"""Training, evaluation and the configuration that drives them."""
