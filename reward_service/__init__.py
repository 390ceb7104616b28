"""Reward service: trains reward models on an agent's feedback, keeps a versioned registry, scores batches."""
