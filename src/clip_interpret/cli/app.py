"""``app``: the web app, the five analyses over one or more runs in the browser (clip_interpret.app)."""

from __future__ import annotations

from .common import add_compute_options


def cmd_app(args) -> int:
    from ..app import serve

    serve(args.runs, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, model=args.model,
          threads=args.threads, concurrency=args.concurrency, device=args.device, precision=args.precision,
          tokenizer=args.tokenizer)
    return 0


def register(sub) -> None:
    p = sub.add_parser("app", help="the web app: the five analyses over one or more runs, in the browser")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted upload in MB (default 10)")
    p.add_argument("--model", default=None, help="model spec for every run (default: each run's own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per request (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="requests served at once (default 4)")
    add_compute_options(p)
    p.set_defaults(func=cmd_app)
