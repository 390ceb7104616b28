"""Requests whose bytes do not parse (invalid UTF-8 in a string field, truncated or garbled messages).

gRPC parses a request before any servicer code runs, and answers UNKNOWN ("Unexpected DecodeError") when the
generated parser raises; in a client stream, one such item ends the whole stream. The interceptor here parses
leniently instead: a unary request that does not parse gets INVALID_ARGUMENT naming the offending field, and in
a request stream the item becomes an `Undecodable` that either ends the stream with INVALID_ARGUMENT (default)
or, for methods marked `per_item`, reaches the servicer, which rejects that item alone.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rlhf.runtime.errors import InvalidArgument, to_rpc_status

_PER_ITEM = "_rlhf_undecodable_per_item"


class Undecodable:
    """A request message whose bytes did not parse; `error` names the field (InvalidArgument)."""

    def __init__(self, error: InvalidArgument, data: bytes = b"") -> None:
        self.error = error
        self.data = data  # the raw bytes, for servicers that split a batch and reject only its bad items


def per_item(method: Callable) -> Callable:
    """Mark a request-streaming RPC whose servicer handles `Undecodable` items itself (one rejection each)."""
    setattr(method, _PER_ITEM, True)
    return method


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _walk(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """The top-level length-delimited fields of a message's bytes as (number, bytes), in order, as far as the
    bytes are well-formed wire format, and whether they all were."""
    fields: list[tuple[int, bytes]] = []
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos)
                fields.append((number, data[pos : pos + length]))
                pos += length
            else:
                return fields, False  # groups or garbage
    except IndexError:
        return fields, False
    return fields, pos == len(data)


def wire_fields(data: bytes) -> list[tuple[int, bytes]] | None:
    """The top-level length-delimited fields of a message's bytes as (number, bytes), in order; None when the
    bytes are not well-formed wire format. Lets a servicer split a batch that did not parse as a whole."""
    fields, complete = _walk(data)
    return fields if complete else None


def bad_string_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The dotted name of the first string field (nested ones included) holding invalid UTF-8, or None."""
    for number, chunk in _walk(data)[0]:
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if not field.message_type.GetOptions().map_entry:
                inner = bad_string_field(chunk, field.message_type, name + ".")
            else:  # a map's entries are messages too; name the map, not key/value
                inner = name if bad_string_field(chunk, field.message_type) else None
            if inner:
                return inner
    return None


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    message_class = getattr(deserializer, "__self__", None)  # deserializers are `Message.FromString`
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    if deserializer is None or descriptor is None:
        return deserializer

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, and whatever else a parser may raise on garbage
            field = bad_string_field(data, descriptor)
            if field:
                return Undecodable(InvalidArgument(field, "is not valid UTF-8"), data)
            return Undecodable(InvalidArgument("request", f"is not a valid {descriptor.full_name} message"), data)

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    await context.abort_with_status(to_rpc_status(request.error))


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def _is_async(behavior: Callable) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if not _is_async(behavior):
        return handler  # synchronous handlers (grpc's reflection) keep grpc's own parsing
    deserializer = _lenient(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream:
        behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    # grpc.aio tells an async handler by its function's kind, so the wrappers are of the same kind.
    if handler.stream_unary:
        inner_unary = handler.stream_unary
        if getattr(inner_unary, _PER_ITEM, False):
            return grpc.stream_unary_rpc_method_handler(inner_unary, deserializer, serializer)

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await inner_unary(_checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    inner_stream = handler.stream_stream
    if getattr(inner_stream, _PER_ITEM, False):
        return grpc.stream_stream_rpc_method_handler(inner_stream, deserializer, serializer)

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in inner_stream(_checked(requests), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)


class LenientDecoding(grpc.aio.ServerInterceptor):
    """Server interceptor: undecodable requests get INVALID_ARGUMENT naming the field (see module doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap(handler)
