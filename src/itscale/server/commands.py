"""`itscale serve`: the OpenAI-compatible server on the embedded engine or in front of one.

Every search setting is a flag of the same name as elsewhere (`--budget`, `--max-steps`,
`--algorithm`, `--reward`, `--option NAME=VALUE`): the defaults a request can override.
SIGTERM (or Ctrl-C) stops accepting connections, lets running searches finish for up to
`--shutdown-timeout` seconds, cancels the rest (their KV sequences are released), closes
the engine and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

EPILOG = """\
examples:
  itscale serve                                   # the embedded default model on 127.0.0.1:8000
  itscale serve --backend-url http://gpu:8001 --backend-model Qwen/Qwen2.5-Math-1.5B-Instruct \\
      --judge-model qwen2.5-coder-0.5b --algorithm particle-filter --budget 16 --port 9000
  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "particle-filter-8:qwen2.5-coder-0.5b",
           "messages": [{"role": "user", "content": "What is 12 * 7?"}]}'
"""


def add_commands(subparsers: Any) -> None:
    from itscale.cli import add_backend_arguments, add_settings_arguments

    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible inference-time-scaling server",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key", default=None, help="require Authorization: Bearer KEY (default: $ITSCALE_API_KEY; none: open)"
    )
    parser.add_argument(
        "--algorithm", help="the default algorithm (particle-filter; with --budget auto:B, compute-optimal)"
    )
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="its default options")
    parser.add_argument("--max-budget", type=int, default=64, help="the largest budget a request may ask (64)")
    parser.add_argument("--max-concurrency", type=int, default=4, help="searches running at once (4)")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond those; then 429 (32)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a search may take; then 504")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish searches on SIGTERM")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; then 413 (1 MiB)")
    parser.add_argument("--n-seq-max", type=int, default=256, help="embedded engine: KV sequences at once (256)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_backend_arguments(parser)
    add_settings_arguments(parser)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from itscale.cli import backend_from, parse_options, resolve_auto_budget, settings_from
    from itscale.errors import UsageError
    from itscale.search import make_algorithm
    from itscale.server.app import Limits, Server, create_app
    from itscale.server.requests import Defaults, _check_reward

    # Everything a user can get wrong is checked before a model is loaded.
    if args.seed is not None:
        raise UsageError("itscale serve takes the seed per request ('seed' in the body), not --seed")
    resolve_auto_budget(args, "particle-filter")
    options = parse_options(args.option)
    make_algorithm(args.algorithm, **options)
    settings = settings_from(args)
    for flag, value in (("--max-budget", args.max_budget), ("--max-concurrency", args.max_concurrency)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.max_queue < 0 or args.request_timeout <= 0 or args.max_body_bytes < 1024:
        raise UsageError("--max-queue must be >= 0, --request-timeout > 0 and --max-body-bytes >= 1024")
    if settings.budget > args.max_budget:
        raise UsageError(f"--budget {settings.budget} is above --max-budget {args.max_budget}")
    if args.algorithm == "compute-optimal" and not args.backend_url:
        from itscale.search.allocation import check_policy_before_loading

        check_policy_before_loading(args.model, options.get("policy"), [settings.budget])
    if args.reward is not None:
        try:
            _check_reward(args.reward)
        except Exception as error:
            raise UsageError(getattr(error, "message", str(error))) from None
    api_key = args.api_key or os.environ.get("ITSCALE_API_KEY") or None

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    backend = backend_from(args)
    lm = backend.open(**({} if args.backend_url else {"n_seq_max": args.n_seq_max}))
    judge = backend.open_judge()
    if args.backend_url and not args.backend_model:
        asyncio.run(lm.start_up())  # the upstream's model name (and a clear error if it is unreachable)
    model_name = lm.name
    server = Server(
        lm,
        judge,
        Defaults(model_name, args.algorithm, args.reward, options, settings, args.max_budget),
        Limits(api_key, args.max_concurrency, args.max_queue, args.request_timeout, args.max_body_bytes),
    )
    config = uvicorn.Config(
        create_app(server),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # the app logs one line per request, with its id
        timeout_graceful_shutdown=args.shutdown_timeout,
        lifespan="on",
    )
    logging.getLogger("itscale.server").info(
        "serving %s on http://%s:%d (%s)", model_name, args.host, args.port, "API key required" if api_key else "open"
    )
    # uvicorn handles SIGTERM and SIGINT while it serves (stop accepting, finish or cancel
    # the running searches), then raises the signal again for the handler it found: that
    # handler is this no-op, so the engine is closed below and the process exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: None)
    try:
        asyncio.run(uvicorn.Server(config).serve())
    finally:
        for model in (lm, judge):
            if model is not None:
                asyncio.run(model.close())
    print("itscale: server stopped", file=sys.stderr)
    return 0
