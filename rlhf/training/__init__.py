"""The algorithms as a library that runs in-process, no server needed: models, the tiny model, PPO, reward models."""
