"""Command line client: stream a generation from the clasp-serve decoder.

  python clients/cli.py "Why is the sky blue?"
  echo "Write a haiku" | python clients/cli.py --temperature 0.8 --seed 1
  python clients/cli.py --session chat-1 "And in French?" --json

A decoder that requires a bearer token reads it from CLASP_AUTH_TOKEN_FILE or CLASP_AUTH_TOKEN; one that
serves TLS needs CLASP_TLS_CA_FILE (and for mutual TLS CLASP_TLS_CLIENT_CERT_FILE, CLASP_TLS_CLIENT_KEY_FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from anywhere

import grpc  # noqa: E402

from clients.sdk import MODES, TLS, ClaspClient, token_from_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clients/cli.py", description="Stream a generation from the clasp-serve decoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="prompt text; read from standard input when omitted")
    p.add_argument("--target", default=os.environ.get("CLASP_TARGET", "127.0.0.1:50051"),
                   help="decoder address host:port [CLASP_TARGET]")
    p.add_argument("--session", default="", help="session id: follow-up turns start from the plan this session learned")
    p.add_argument("--request-id", default="", help="request id (for Abort and logs); the server makes one if empty")
    p.add_argument("--raw", action="store_true", help="send the prompt without the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    p.add_argument("--temperature", type=float, default=None, help="0/unset: greedy; > 0 samples (lossless)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--mode", choices=list(MODES), default=None, help="speculation mode; default: the server's")
    p.add_argument("--replan-interval", type=int, default=None, help="LOI; default: the server's")
    p.add_argument("--num-skip-layers", type=int, default=None, help="M; default: the server's")
    p.add_argument("--max-draft-length", type=int, default=None, help="K; default: the server's")
    p.add_argument("--timeout-s", type=float, default=None, help="deadline for the whole generation")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--info", action="store_true", help="print what the decoder serves (ModelInfo) as JSON and exit")
    p.add_argument("--wait-s", type=float, default=0.0, help="first wait up to this long for the decoder to be SERVING")
    return p


def print_info(args: argparse.Namespace) -> int:
    try:
        with ClaspClient(args.target) as client:
            if args.wait_s:
                client.wait_ready(args.wait_s)
            print(json.dumps(client.model_info()))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.info:
        return print_info(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    options = dict(session_id=args.session, request_id=args.request_id, raw_prompt=args.raw,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, mode=args.mode,
                   replan_interval=args.replan_interval, num_skip_layers=args.num_skip_layers,
                   max_draft_length=args.max_draft_length)
    try:
        with ClaspClient(args.target, token=token_from_env(), tls=TLS.from_env()) as client:
            if args.wait_s:
                client.wait_ready(args.wait_s)
            on_text = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            result = client.generate(prompt, timeout_s=args.timeout_s, on_text=on_text, **options)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "request_id": result.request_id, "num_prompt_tokens": result.num_prompt_tokens,
                          "stats": result.stats}))
    else:
        s = result.stats
        print(f"\n[{len(result.token_ids)} tokens, finish {result.finish_reason}, mean accepted length "
              f"{s.get('mean_accepted_length', 0):.2f}, drafted {s.get('num_draft_tokens', 0)}, accepted "
              f"{s.get('num_accepted_tokens', 0)}, plan versions {s.get('plan_versions', [])}, "
              f"skip set {s.get('skip_set', [])}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
