"""Training: the one loop (loop.py), optimizer and schedule (optim.py), checkpoints, metrics."""
