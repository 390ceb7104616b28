"""Policy service: trains agents' policies with PPO against the reward service, and keeps a policy registry."""
