"""Shared package of the RLHF platform: contracts, server bootstrap, config, client SDK and the `rlhf` CLI."""

__version__ = "0.1.0"
