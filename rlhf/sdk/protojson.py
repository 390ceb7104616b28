"""Protobuf messages as plain JSON-ready dicts, the way people (and the command line's --json) read them.

protobuf's own JSON mapping prints 64-bit integers as strings and leaves out fields at their default value,
so an empty agent's stats have no `feedback_count` and a count of 10 reads "10". `message_to_dict` keeps
every field (defaults included), prints int64 as JSON numbers, and keeps the proto field names.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field with its proto name, defaults included, 64-bit integers as numbers; enums by name,
    timestamps as RFC 3339 strings (protobuf's JSON mapping otherwise)."""
    raw = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(raw, message.DESCRIPTOR)


def _is_well_known(descriptor: Descriptor) -> bool:
    # Timestamp, Struct, Duration...: their JSON form is not field by field.
    return descriptor.full_name.startswith("google.protobuf.")


def _numbers(value: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """`value` in the descriptor's field order, int64 as numbers, unset sub-messages as their defaults."""
    if _is_well_known(descriptor):
        return value
    out: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in value:
            if field.message_type is not None and not field.is_repeated and not _is_well_known(field.message_type):
                out[field.name] = _numbers(
                    json_format.MessageToDict(
                        _empty(field.message_type),
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    ),
                    field.message_type,
                )
            continue
        item = value[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _convert(v, value_field) for k, v in item.items()}
        elif field.is_repeated:
            out[field.name] = [_convert(v, field) for v in item]
        else:
            out[field.name] = _convert(item, field)
    return out


def _empty(descriptor: Descriptor) -> Message:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)()


def _convert(item: Any, field: FieldDescriptor) -> Any:
    if field.type in _INT64 and isinstance(item, str):
        return int(item)
    if field.message_type is not None and isinstance(item, dict):
        return _numbers(item, field.message_type)
    return item
