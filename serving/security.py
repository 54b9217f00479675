"""What guards both services: optional bearer tokens and TLS on gRPC, requests that do not parse, and
the Redis ACL user they log in as.

Tokens come from a file (`--auth-token-file`, one `identity:token` or bare `token` per line) or the
CLASP_AUTH_TOKEN environment variable, never from a command line, and are never logged. Every
method but the health checks (which Kubernetes probes call without credentials) then needs
`authorization: Bearer <token>`; anything else is UNAUTHENTICATED. Tokens are compared in
constant time (hmac.compare_digest, against every known token). Admin methods (the planner's
GetPlan) take only the identities named admins; any other valid token is PERMISSION_DENIED.
Without tokens nothing is authenticated, admin methods included (the NetworkPolicies are then
what keeps callers out).

A request whose bytes do not parse as its message used to end as UNKNOWN with grpc's internal
exception text; it is INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from pathlib import Path

import grpc

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
DEFAULT_IDENTITY = "default"


def load_tokens(path: str | os.PathLike | None, env_token: str | None = None) -> dict[str, str]:
    """identity -> token from a token file and/or one token from the environment ({} when neither)."""
    tokens: dict[str, str] = {}
    if path:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            identity, _, token = line.rpartition(":") if ":" in line else (DEFAULT_IDENTITY, "", line)
            identity = identity.strip() or DEFAULT_IDENTITY
            token = token.strip()
            if len(token) < 16:
                raise ValueError(f"{path}:{n}: tokens must be at least 16 characters")
            if identity in tokens:
                raise ValueError(f"{path}:{n}: identity {identity!r} appears twice")
            tokens[identity] = token
    if env_token:
        if len(env_token) < 16:
            raise ValueError("CLASP_AUTH_TOKEN must be at least 16 characters")
        tokens.setdefault(DEFAULT_IDENTITY, env_token)
    return tokens


class BearerAuth:
    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        self._tokens = [(identity, token.encode()) for identity, token in tokens.items()]

    def identity(self, metadata) -> str | None:
        """The identity whose token the call carries, or None."""
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                text = value if isinstance(value, str) else value.decode("latin-1")
                if text[:7].lower() == "bearer ":
                    presented = text[7:].strip().encode()
        if not presented:
            return None
        found = None
        for identity, token in self._tokens:  # every token, so the time does not say which one matched
            if hmac.compare_digest(presented, token) and found is None:
                found = identity
        return found


class _Malformed:
    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _lenient(deserializer, type_name: str):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:
            return _Malformed(type_name)

    return deserialize


def _message_name(method: str) -> str:
    return method.rsplit("/", 1)[-1] + " request"


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Put first in the server's interceptors: authenticates (when auth is set), authorizes admin
    methods, then turns unparsable request bytes into INVALID_ARGUMENT before the servicer sees them."""

    def __init__(self, auth: BearerAuth | None = None, admin_methods: frozenset[str] = frozenset(),
                 admins: frozenset[str] = frozenset()) -> None:
        self.auth = auth
        self.admin_methods = admin_methods  # full method names, e.g. /clasp.v1.Planner/GetPlan
        self.admins = admins  # token identities that may call them

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        identity = (self.auth.identity(handler_call_details.invocation_metadata)
                    if self.auth is not None and method not in OPEN_METHODS else None)
        unauthenticated = self.auth is not None and method not in OPEN_METHODS and identity is None
        forbidden = (self.auth is not None and method in self.admin_methods and identity is not None
                     and identity not in self.admins)
        denied = unauthenticated or forbidden
        name = _message_name(method)
        deserialize = _lenient(handler.request_deserializer, name)

        async def refuse(request, context):
            if unauthenticated:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            if forbidden:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method.rsplit('/', 1)[-1]} is an admin method; identity {identity!r} "
                                    "is not an admin (--admin-identities)")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {request.type_name}")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if denied or isinstance(request, _Malformed):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if denied or isinstance(request, _Malformed):
                    await refuse(request, context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, handler.response_serializer)
        if denied:  # streaming requests (server reflection): refused whole
            async def refuse_stream(request_iterator, context):
                await refuse(None, context)

            if handler.stream_stream:
                return grpc.stream_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                             handler.response_serializer)
            return grpc.stream_unary_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler


def add_security_flags(parser, env) -> None:
    """The flags both services take for this module (env: serving.env.env)."""
    parser.add_argument("--auth-token-file", default=env("AUTH_TOKEN_FILE") or None,
                        help="require 'authorization: Bearer <token>' on every RPC but health; the file holds one "
                             "'identity:token' per line (the token itself may also come from CLASP_AUTH_TOKEN) "
                             "[CLASP_AUTH_TOKEN_FILE]")
    parser.add_argument("--tls-cert-file", default=env("TLS_CERT_FILE") or None,
                        help="serve gRPC over TLS with this PEM certificate (chain) [CLASP_TLS_CERT_FILE]")
    parser.add_argument("--tls-key-file", default=env("TLS_KEY_FILE") or None,
                        help="its PEM private key [CLASP_TLS_KEY_FILE]")
    parser.add_argument("--tls-client-ca-file", default=env("TLS_CLIENT_CA_FILE") or None,
                        help="mutual TLS: require client certificates signed by this PEM CA [CLASP_TLS_CLIENT_CA_FILE]")
    parser.add_argument("--reflection", action="store_true", default=env("REFLECTION", "") in ("1", "true", "on"),
                        help="serve gRPC server reflection (off by default; behind the tokens when they are set) "
                             "[CLASP_REFLECTION=1]")


def add_port(server: grpc.aio.Server, address: str, args) -> int:
    """Listen on address: TLS when --tls-cert-file is given (mutual with --tls-client-ca-file)."""
    if not args.tls_cert_file:
        if args.tls_key_file or args.tls_client_ca_file:
            raise ValueError("--tls-key-file and --tls-client-ca-file need --tls-cert-file")
        return server.add_insecure_port(address)
    if not args.tls_key_file:
        raise ValueError("--tls-cert-file needs --tls-key-file")
    pair = (Path(args.tls_key_file).read_bytes(), Path(args.tls_cert_file).read_bytes())
    client_ca = Path(args.tls_client_ca_file).read_bytes() if args.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    return server.add_secure_port(address, credentials)


def auth_from_env(token_file: str | None) -> BearerAuth | None:
    """BearerAuth from --auth-token-file and CLASP_AUTH_TOKEN, or None when neither is set."""
    tokens = load_tokens(token_file, os.environ.get("CLASP_AUTH_TOKEN"))
    return BearerAuth(tokens) if tokens else None


def caller_identity(auth: BearerAuth | None, context) -> str | None:
    return auth.identity(context.invocation_metadata()) if auth is not None else None


# The Redis ACL user the services log in as: the commands they send and the keys and channels
# they use (serving.plan_wire names them), nothing else; FLUSHALL, KEYS, CONFIG, EVAL, DEL and
# keys outside clasp:* are NOPERM. redis-py's INCR sends INCRBY.
REDIS_USER = "clasp"
REDIS_COMMANDS = ("ping", "get", "set", "mget", "incr", "incrby", "expire", "publish", "subscribe", "unsubscribe",
                  "xadd", "xreadgroup", "xautoclaim", "xack", "xgroup|create", "xgroup|delconsumer",
                  "xinfo|consumers")


def redis_acl_rules(password: str) -> list[str]:
    """The ACL rules of the services' user, the password as its SHA-256 (so configs hold no secret)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return ["on", f"#{digest}", "resetkeys", "~clasp:*", "resetchannels", "&clasp:*", "-@all",
            *(f"+{c}" for c in REDIS_COMMANDS)]


def redis_acl_config(password: str) -> str:
    """redis.conf lines: the default user off, the services' user on."""
    return f"user default off\nuser {REDIS_USER} {' '.join(redis_acl_rules(password))}\n"


def write_redis_acl_config(password_file: str, out_file: str | None = None) -> None:
    """redis_acl_config for the password in password_file, to out_file (mode 600) or stdout."""
    config = redis_acl_config(Path(password_file).read_text().strip())
    if out_file is None:
        sys.stdout.write(config)
        return
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config)


if __name__ == "__main__":  # make start (stdout), and the Kubernetes Redis pod's init container (a file)
    if sys.argv[1:2] != ["redis-conf"] or len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m serving.security redis-conf PASSWORD_FILE [OUT_FILE]")
    write_redis_acl_config(*sys.argv[2:])
