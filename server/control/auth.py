"""The bearer token in front of the control plane's mutating calls, as a gRPC interceptor."""

from __future__ import annotations

import hmac

import grpc


class TokenAuth(grpc.ServerInterceptor):
    """Lets a call to one of `methods` ("/package.Service/Method") through only with
    `authorization: Bearer <token>` metadata; any other call passes untouched.

    With no token configured those calls are refused outright: a job without
    a token has no mutating calls.  The check runs before the request bytes
    are decoded, so an unauthenticated caller learns nothing about parsing.
    """

    def __init__(self, token: bytes | None, methods: frozenset[str]):
        self._token = token
        self._methods = methods

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self._methods:
            return continuation(handler_call_details)
        why = self.refusal(handler_call_details.invocation_metadata or ())
        if why is None:
            return continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(_aborting(why))

    def refusal(self, metadata) -> str | None:
        """Why a call with this metadata is refused (None: it may go on)."""
        if self._token is None:
            return "this job has no token configured: mutating calls are disabled"
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return "missing authorization metadata"
        value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        scheme, _, presented = value.partition(b" ")
        # constant time: the comparison must not tell a caller how much of a guess was right
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self._token):
            return "invalid token"
        return None


def _aborting(message: str):
    def abort(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return abort
