"""The detector: selecting its data, fine-tuning (`train-detector`), the learning-rate
sweep (`tune`), and the held-out evaluation (`evaluate`) with its metrics and figures."""
