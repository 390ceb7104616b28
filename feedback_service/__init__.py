"""Feedback service: durable, idempotent ingestion of ratings and comparisons per agent, with stats and exports.

Layout (transport, domain and storage apart, each testable alone):
  config.py    FeedbackServiceConfig: server settings plus this service's limits and tuning.
  models.py    Plain domain records shared by the layers (no protobuf, no SQL).
  store.py     SQLAlchemy persistence: the `feedback` table and its queries (blocking calls).
  validate.py  Field rules and size caps; every failure is InvalidArgument naming the field.
  grouping.py  The bounded buffer that turns a stream into commit groups (back pressure included).
  domain.py    FeedbackDomain: submit, stream ingestion with group commit, list, stats, export, delete;
               runs the blocking store calls off the event loop.
  servicer.py  FeedbackServicer: protobuf <-> domain conversion only.
  app.py       Bootstrap: engine, tables, servicer, gRPC server; `python -m feedback_service`.
"""
