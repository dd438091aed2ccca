"""Training: data pipeline (`train.data`), configs, optimizer and the training loop."""
