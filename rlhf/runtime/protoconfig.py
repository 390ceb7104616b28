"""Convert between config messages (every field `optional` or repeated: unset means default) and dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

T = TypeVar("T")


def from_message(message: Message | None, cls: type[T], **overrides: Any) -> T:
    """A `cls` instance: fields set in `message` win over the dataclass defaults; `overrides` win over both."""
    values: dict[str, Any] = {}
    if message is not None:
        for field in dataclasses.fields(cls):
            descriptor = message.DESCRIPTOR.fields_by_name.get(field.name)
            if descriptor is None:
                continue
            if descriptor.is_repeated:
                items = list(getattr(message, field.name))
                if descriptor.message_type is not None:  # messages travel in configs as JSON-like dicts
                    items = [json_format.MessageToDict(i, preserving_proto_field_name=True) for i in items]
                if items:
                    values[field.name] = items
            elif message.HasField(field.name):
                values[field.name] = getattr(message, field.name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_message(config: Any, message_cls: type[Message]) -> Message:
    """The message with every field of `config` that the message knows set."""
    message = message_cls()
    names = message_cls.DESCRIPTOR.fields_by_name
    for key, value in dataclasses.asdict(config).items():
        if key not in names or value is None:
            continue
        if isinstance(value, list) and names[key].message_type is not None:
            for item in value:
                json_format.ParseDict(item, getattr(message, key).add())
        elif isinstance(value, list):
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)
    return message
