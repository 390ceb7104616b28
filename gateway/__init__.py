"""REST gateway: the seed's HTTP API (feedback, train_policy, policies, jobs) over the gRPC services."""
