"""Wrapping gRPC method handlers in server interceptors: a check that may refuse a
call before its servicer runs, whatever kind the servicer method is (coroutine,
async generator, plain function or generator)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[[Any, Any], Any]
# (request, context) -> (status, message) to refuse the call with, or None to let it run.
# For request streams the "request" is the stream, for checks that need no message.
Check = Callable[[Any, Any], "tuple[grpc.StatusCode, str] | None"]


def guard(behavior: Behavior, check: Check) -> Behavior:
    """BEHAVIOR, run only when CHECK lets the call through; keeps its kind."""
    if inspect.isasyncgenfunction(behavior):

        async def guarded_async_gen(request: Any, context: Any) -> Any:
            if (refusal := check(request, context)) is not None:
                await context.abort(*refusal)
            async for response in behavior(request, context):
                yield response

        return guarded_async_gen
    if inspect.iscoroutinefunction(behavior):

        async def guarded_coroutine(request: Any, context: Any) -> Any:
            if (refusal := check(request, context)) is not None:
                await context.abort(*refusal)
            return await behavior(request, context)

        return guarded_coroutine
    if inspect.isgeneratorfunction(behavior):

        def guarded_generator(request: Any, context: Any) -> Any:
            if (refusal := check(request, context)) is not None:
                context.abort(*refusal)
            yield from behavior(request, context)

        return guarded_generator

    def guarded(request: Any, context: Any) -> Any:
        if (refusal := check(request, context)) is not None:
            context.abort(*refusal)
        return behavior(request, context)

    return guarded


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior],
                 **changes: Any) -> grpc.RpcMethodHandler:
    """The same handler with its behavior passed through WRAP and other fields (such
    as `request_deserializer`) replaced by CHANGES."""
    kind = next(name for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, name) is not None)
    # grpc's method handlers are namedtuples (grpc is untyped here: no ignore needed).
    replaced: grpc.RpcMethodHandler = handler._replace(
        **{kind: wrap(getattr(handler, kind))}, **changes)
    return replaced
