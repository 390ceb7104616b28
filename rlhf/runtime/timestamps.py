"""datetime <-> google.protobuf.Timestamp."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp


def to_proto(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc))
    return stamp
