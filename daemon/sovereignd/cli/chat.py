"""`chat`: a terminal chat with the model through the gateway, as a client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sovereignd.cli.common import EX_OK, config_arg, load_config


def _cmd_chat(args: argparse.Namespace) -> int:
    from sovereignd import chat

    url = args.url
    if url is None:
        if args.config is None:
            raise chat.ChatError("give --url http://HOST:PORT or --config PATH (its "
                                 "gateway.listen)")
        url = f"http://{load_config(args).gateway.listen}"
    session = chat.Session(url.rstrip("/"), chat.read_key(args.key_file), args.model,
                           sys.stdout, max_tokens=args.max_tokens, transcript=args.transcript)
    try:
        chat.run(session)
    except KeyboardInterrupt:
        print()
    return EX_OK


def add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chat", help="chat with the model through the gateway, as a client")
    p.add_argument("--url", metavar="URL",
                   help="the gateway (http://HOST:PORT); default: gateway.listen of --config")
    p.add_argument("--key-file", type=Path, metavar="PATH",
                   help="file holding the client key (else $SOVEREIGND_API_KEY; never the key "
                        "on the command line)")
    p.add_argument("--model", help="model to talk to; default: the first the key may use")
    p.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    p.add_argument("--transcript", type=Path, metavar="FILE",
                   help="append each turn to FILE as a JSON line (a local file of your own)")
    config_arg(p, required=False)
    p.set_defaults(handler=_cmd_chat)
