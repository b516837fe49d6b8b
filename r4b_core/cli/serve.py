"""``r4b serve``: an OpenAI-compatible chat server (r4b_core/serve/) on 127.0.0.1 by default.

    r4b serve --model DIR|HUB_ID [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] [--max-seq-len N]
              [--kv-cache-tokens N | --kv-cache-gb GB] [--max-num-batched-tokens N] [--no-prefix-caching] [--exact]
              [--max-queue N] [--thinking-mode auto] [--max-thinking-tokens N] [--compile] [--api-key KEY]
              [--allow-remote-images] [--allow-local-images DIR] [--quantize auto|none|int8] [--device] [--dtype]
              [--ssl-certfile PEM --ssl-keyfile PEM]

Every option is checked before the weights load, and the listening socket is bound then too: a port in
use, a --host that does not resolve or is not this machine's, or a port the user may not bind is one line
``r4b: error: ...`` and exit status 1 before any loading (the bound socket is handed to uvicorn, so no
other process takes the port meanwhile; clients are refused until the model is ready); so is a
--ssl-certfile / --ssl-keyfile that is missing or not a certificate and its key (loaded once to check).
The server runs until SIGTERM or Ctrl-C, then stops admitting, lets running requests finish (cancelling
what is left after --shutdown-timeout) and exits with status 0 after SIGTERM, 130 after Ctrl-C. Binding
to an address other than loopback without --api-key prints a warning.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import ssl
from pathlib import Path

from r4b_core.cli.common import (
    UsageError,
    add_quantize,
    finite_float,
    non_negative_int,
    positive_int,
    progress_to_stderr,
    set_up,
)

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_QUEUE = 64
API_KEY_ENV = "R4B_API_KEY"


def _port(text: str) -> int:
    """argparse type: a TCP port, 1..65535 (one message for every out-of-range value, 0 and -1 included)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (a TCP port, 1..65535), got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction,
               parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", parents=parents, help="an OpenAI-compatible chat server with continuous batching",
        description="Serve the model over HTTP with OpenAI's chat-completions API (/v1/chat/completions, "
                    "/v1/models, /health): requests are batched continuously over one paged KV cache; the "
                    "thinking goes to reasoning_content and the answer to content.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: --model as given, or 'r4b')")
    s.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                   help=f"requests decoded together: the KV cache's rows (default {DEFAULT_MAX_BATCH_SIZE})")
    s.add_argument("--max-seq-len", type=positive_int, metavar="N",
                   help="tokens per request, prompt + answer (default min(32768, the model's "
                        "max_position_embeddings)); costs nothing until a request uses it (paged KV cache)")
    kv = s.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=positive_int, metavar="N",
                    help="the paged KV cache's pool, in tokens shared by all requests (default max(32768, "
                         "--max-seq-len))")
    kv.add_argument("--kv-cache-gb", type=finite_float, metavar="GB",
                    help="the paged KV cache's pool as a memory budget in GiB (instead of --kv-cache-tokens)")
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=512, metavar="N",
                   help="tokens per engine step, decode rows + prefill chunks: a long prompt is prefilled in "
                        "chunks of about N so running streams keep decoding (default 512)")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of earlier requests with the same prefix")
    s.add_argument("--exact", action="store_true",
                   help="a request's tokens independent of its neighbours, bit for bit: every step decodes "
                        "--max-batch-size rows over --max-seq-len slots, no prefix cache, prompts unchunked (slow)")
    s.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests waiting for a free slot; past it the server answers 429 (default "
                        f"{DEFAULT_MAX_QUEUE})")
    s.add_argument("--thinking-mode", default="auto", choices=["auto", "long", "short"],
                   help="default for requests without chat_template_kwargs.thinking_mode (default auto)")
    s.add_argument("--max-thinking-tokens", type=non_negative_int, metavar="N",
                   help="default thinking budget: after N thinking tokens r4b closes the thinking and the model "
                        "answers (a request's max_thinking_tokens overrides it; default: no limit)")
    s.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (CUDA graphs on GPU); the first step compiles")
    add_quantize(s)
    s.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "triton"],
                   help="decode attention: auto (Triton on CUDA when supported, else SDPA), sdpa, or triton")
    s.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else none)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (size and time limited); default: data: URIs only")
    s.add_argument("--allow-local-images", metavar="DIR", type=Path,
                   help="read local image files (file:// URLs or paths), only inside DIR (symlinks resolved)")
    s.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                   help="refuse images with more pixels, before decoding them (default 40,000,000)")
    s.add_argument("--max-body-mb", type=finite_float, default=32.0, metavar="MB",
                   help="largest request body in MiB; larger ones get 413 (default 32)")
    s.add_argument("--shutdown-timeout", type=finite_float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, let running requests finish for this long, then cancel them "
                        "(default 30)")
    s.add_argument("--ssl-certfile", metavar="PEM", type=Path,
                   help="serve HTTPS with this certificate (chain) file; needs --ssl-keyfile unless the file holds "
                        "the key too")
    s.add_argument("--ssl-keyfile", metavar="PEM", type=Path, help="the private key of --ssl-certfile")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    return s


def is_loopback(host: str) -> bool:
    """True for 'localhost' and any loopback IP (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets (http://[::1]:8000)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound (not yet listening) to ``host``:``port``, as uvicorn binds one (SO_REUSEADDR); an
    OSError whose message names the flag to change when the host does not resolve or the bind fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
        name, _, port_text = host.rpartition(":")
        if name and ":" not in name and port_text.isdigit():  # "127.0.0.1:8000": the port belongs in --port
            raise OSError(f"--host {host!r}: give the address alone and the port with --port "
                          f"(--host {name} --port {port_text}).") from None
        raise OSError(f"--host {host!r}: cannot resolve it to an address ({reason}); give an IP address such as "
                      "127.0.0.1 or 0.0.0.0, or a name this machine resolves.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = f"{url_host(host)}:{port}"
        if e.errno == errno.EADDRINUSE:
            message = f"--port {port}: {where} is already in use (another server?); stop it or choose another --port."
        elif e.errno == errno.EACCES:
            message = (f"--port {port}: permission denied to listen on {where} (ports below 1024 need privileges); "
                       "choose a port from 1024 up.")
        elif e.errno == errno.EADDRNOTAVAIL:
            message = (f"--host {host}: not an address of this machine, so nothing can listen on it ({e.strerror}); "
                       "use 127.0.0.1, 0.0.0.0 or one of this machine's addresses.")
        else:
            message = f"--host {host} --port {port}: cannot listen on {where} ({e.strerror or e})."
        raise OSError(message) from None
    return sock


def check_tls_files(certfile: Path | None, keyfile: Path | None) -> None:
    """--ssl-certfile / --ssl-keyfile loaded once as uvicorn will load them: an OSError naming the flag and
    the file when one is missing, unreadable, or the pair is not a certificate and its key."""
    if certfile is None:
        if keyfile is not None:
            raise OSError(f"--ssl-keyfile {keyfile}: given without --ssl-certfile; pass the certificate too.")
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not path.expanduser().is_file():
            raise OSError(f"{flag} {path}: no such file.")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            certfile.expanduser(), None if keyfile is None else keyfile.expanduser())
    except (ssl.SSLError, OSError) as e:
        pair = f"--ssl-certfile {certfile}" + ("" if keyfile is None else f" --ssl-keyfile {keyfile}")
        raise OSError(f"{pair}: not a PEM certificate and its private key ({getattr(e, 'reason', None) or e.strerror or e}); "
                      "give the server's certificate chain and the key it was issued for.") from None


def run(args: argparse.Namespace) -> int:
    import fastapi  # noqa: F401  (a missing 'serve' extra is reported before the weights load)
    import uvicorn  # noqa: F401

    from r4b_core.config import R4BConfig
    from r4b_core.models.fast_linears import fast_linears
    from r4b_core.serve.api import ServerConfig, create_app
    from r4b_core.serve.engine import Engine
    from r4b_core.serve.images import DEFAULT_MAX_IMAGE_PIXELS, ImagePolicy
    from r4b_core.serve.server import serve_forever

    if args.max_body_mb <= 0 or args.shutdown_timeout < 0:
        raise UsageError("--max-body-mb must be positive and --shutdown-timeout at least 0.")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise UsageError(f"--kv-cache-gb {args.kv_cache_gb}: must be positive.")
    local_dir = args.allow_local_images
    if local_dir is not None and not local_dir.expanduser().is_dir():
        raise UsageError(f"--allow-local-images {local_dir}: not a directory.")
    check_tls_files(args.ssl_certfile, args.ssl_keyfile)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    listening = bind_socket(args.host, args.port)  # before the weights load: a taken port fails at once
    if not is_loopback(args.host) and api_key is None:
        progress_to_stderr(f"r4b serve: warning: listening on {args.host} without --api-key; anyone who can reach "
                           "this address can use the model.")
    setup = set_up(args, synthetic_note="its text is random", default_max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    directory, dtype, device = setup.directory, setup.dtype, setup.device
    positions = R4BConfig.from_pretrained(directory).text_config.max_position_embeddings
    if args.max_seq_len is not None and not 2 <= args.max_seq_len <= positions:
        raise UsageError(f"--max-seq-len {args.max_seq_len}: must be in 2..{positions} (the model's "
                         "max_position_embeddings).")
    processor = setup.load_processor()  # the server's one image limit: --max-image-pixels, else the default
    model = setup.load_model()
    # --quantize: prepacked (CPU; its layout tuned for --max-batch-size rows) / as loaded / int8
    fast_linears(model, args.quantize, compile=args.compile, rows_hint=args.max_batch_size)
    generation_config = processor.generation_config
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else processor.pad_token_id
    try:
        engine = Engine(model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                        max_queue=args.max_queue, eos_token_ids=processor.eos_token_ids, pad_token_id=pad,
                        compile=args.compile, attention_backend=args.attention_backend,
                        kv_cache_tokens=args.kv_cache_tokens, kv_cache_gb=args.kv_cache_gb,
                        token_budget=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching,
                        exact=args.exact)
    except ValueError as e:  # a pool too small for one block, a budget below one batch, ...
        raise UsageError(str(e)) from None
    name = args.served_model_name or args.model or "r4b"
    config = ServerConfig(
        model_name=name, api_key=api_key, thinking_mode=args.thinking_mode,
        max_thinking_tokens=args.max_thinking_tokens, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        images=ImagePolicy(allow_remote=args.allow_remote_images,
                           local_dir=None if local_dir is None else local_dir.expanduser(),
                           max_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS),
        shutdown_deadline_s=args.shutdown_timeout)
    app = create_app(engine, processor, config)
    scheme = "http" if args.ssl_certfile is None else "https"
    progress_to_stderr(f"r4b serve: model {name!r} ({directory}, {dtype}, {device}); up to {args.max_batch_size} "
                       f"requests of {engine.max_seq_len} tokens over a KV pool of {engine.kv_cache_tokens} tokens "
                       f"({engine.cache.nbytes / 2**30:.2f} GiB); {scheme}://{url_host(args.host)}:{args.port}/v1")
    stopped_by = serve_forever(app, engine, args.host, args.port, deadline_s=args.shutdown_timeout,
                               log_level=args.log_level, sockets=[listening],
                               ssl_certfile=None if args.ssl_certfile is None else str(args.ssl_certfile.expanduser()),
                               ssl_keyfile=None if args.ssl_keyfile is None else str(args.ssl_keyfile.expanduser()))
    progress_to_stderr("r4b serve: stopped")
    return 130 if stopped_by == signal.SIGINT else 0  # Ctrl-C: 130, as for every r4b command
