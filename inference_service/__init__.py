"""Inference service: serves an agent's policy versions (or the base model) with weighted A/B deployments,
sticky routing, sampling and streaming, and logs every generation so feedback can be attributed to the
version that produced it.

Modules: config (settings), records (plain data), store (SQLAlchemy tables), policy_client (the policy
service over gRPC), models (lazy LRU model cache), generation (token-by-token sampling), routing
(weighted version choice), domain (the logic), servicer (protobuf <-> domain), app (bootstrap and CLI).
"""
