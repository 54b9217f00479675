"""python -m http_gateway: the OpenAI-compatible HTTP API in front of a decoder. Flags read CLASP_* variables."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time
import urllib.request

import structlog
import uvicorn

from http_gateway.app import Settings, create_app
from serving.env import env
from serving.service import configure_logging

log = structlog.get_logger("http")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m http_gateway", description=(
        "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health) that "
        "translates every request to the decoder's gRPC Generate stream."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default=env("HTTP_HOST", env("HOST", "127.0.0.1")),
                   help="listen address [CLASP_HTTP_HOST, else CLASP_HOST]")
    p.add_argument("--port", type=int, default=int(env("HTTP_PORT", 8000)), help="HTTP port [CLASP_HTTP_PORT]")
    p.add_argument("--decoder", default=env("DECODER_TARGET", "127.0.0.1:50051"),
                   help="the decoder's gRPC address host:port [CLASP_DECODER_TARGET]")
    p.add_argument("--api-key", default=env("API_KEY", ""),
                   help="require 'Authorization: Bearer <key>' on /v1; empty: no authentication [CLASP_API_KEY]")
    p.add_argument("--request-timeout-s", type=float, default=float(env("REQUEST_TIMEOUT_S", 0)),
                   help="deadline of each generation, 0 for none [CLASP_REQUEST_TIMEOUT_S]")
    p.add_argument("--grace-period-s", type=float, default=float(env("GRACE_PERIOD_S", 20)),
                   help="on SIGTERM, time in-flight requests get to finish [CLASP_GRACE_PERIOD_S]")
    p.add_argument("--wait-healthy", type=float, default=0.0, metavar="S",
                   help="do not serve: wait up to S seconds for the gateway at --host/--port to answer /health "
                        "with 200, exit 1 if it does not (for scripts)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[CLASP_LOG_LEVEL]")
    return p


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def wait_healthy(host: str, port: int, timeout_s: float) -> int:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return 0
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"{url} not healthy after {timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.2)


def main() -> None:
    args = build_parser().parse_args()
    if args.wait_healthy:
        sys.exit(wait_healthy(args.host, args.port, args.wait_healthy))
    configure_logging(args.log_level)
    if not args.api_key and not is_loopback(args.host):
        log.warning("no API key on a non-loopback address: anyone who can reach it can generate; "
                    "set --api-key or CLASP_API_KEY", host=args.host)
    settings = Settings(decoder_target=args.decoder, api_key=args.api_key or None,
                        request_timeout_s=args.request_timeout_s or None)
    log.info("listening", host=args.host, port=args.port, decoder=args.decoder, auth=bool(args.api_key))
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish for the
    # grace period, then cancels them (which cancels their decoder streams).
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=int(args.grace_period_s), lifespan="on")


if __name__ == "__main__":
    main()
