"""serve: the OpenAI-compatible HTTP server."""

import os

from .common import _add_model_args, _non_negative_int, _positive_int, _resolve, _weights


def add_commands(sub):
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                         description="Serve GPT-2 over HTTP: /v1/completions, /v1/chat/completions, "
                                     "/v1/models, /health, and a page to try it at /.")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=_non_negative_int, default=8000, help="default: 8000; 0 picks a free port")
    srv.add_argument("--max-batch", type=_positive_int, default=4,
                     help="requests decoded together in one step (default: 4)")
    srv.add_argument("--max-queue", type=_positive_int, default=16,
                     help="requests waiting for a place before new ones get 429 (default: 16)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    srv.add_argument("--threads", type=_positive_int, default=None,
                     help="threads for the matrix products (default: one per core)")

def _cmd_serve(args):
    from ..serve import serve

    if args.threads is not None:
        from ..threads import set_threads

        set_threads(args.threads)
    path, weights = _resolve(args.model, args.n_head), _weights(args)

    def load():
        from ..model import GPT2
        from ..tokenizer import Tokenizer

        model = GPT2.from_pretrained(path, dtype=args.dtype, n_head=args.n_head, weights=weights)
        name = args.model or os.path.basename(os.path.normpath(path))
        return model, Tokenizer.from_pretrained(path), name

    serve(load, args.host, args.port, args.api_key, args.max_batch, args.max_queue)


COMMANDS = {"serve": _cmd_serve}
