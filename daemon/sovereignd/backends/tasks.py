"""What a model does, as the server will decide it: generate text, or pool (embed, classify).

vLLM picks the runner from `--runner` and `--convert` (vLLM 0.32 `vllm serve --help`;
`--task` in older releases), else from the model's architecture name by suffix
(`_SUFFIX_TO_DEFAULTS` in vllm/config/model.py, vllm 0.32: `*ForCausalLM` generates,
`*EmbeddingModel`/`*Model` embed, `*ForSequenceClassification` classifies). The canary
and `check` follow the same decision, so that READY means the model's real job works.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sovereignd.backends.modelfiles import flag_value

GENERATE, EMBED, CLASSIFY = "generate", "embed", "classify"

# vllm/config/model.py _SUFFIX_TO_DEFAULTS (vllm 0.32), first match wins.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", GENERATE), ("ForConditionalGeneration", GENERATE),
    ("ChatModel", GENERATE), ("LMHeadModel", GENERATE),
    ("ForTextEncoding", EMBED), ("EmbeddingModel", EMBED),
    ("ForSequenceClassification", CLASSIFY), ("ForTokenClassification", CLASSIFY),
    ("ForAudioClassification", CLASSIFY), ("ForImageClassification", CLASSIFY),
    ("ForVideoClassification", CLASSIFY), ("ClassificationModel", CLASSIFY),
    ("ForRewardModeling", EMBED), ("RewardModel", EMBED), ("Model", EMBED),
)
# Older `--task` values (vLLM < 0.10) that select the pooling runner.
_POOLING_TASKS = {"embed": EMBED, "embedding": EMBED, "reward": EMBED, "classify": CLASSIFY,
                  "score": CLASSIFY}


def _flag(args: Sequence[str], name: str) -> str | None:
    # vLLM's parser reads `_` as `-` (--convert / --runner have no underscore forms to
    # confuse); the last occurrence wins, as in argparse.
    return flag_value([a.replace("_", "-", 2) if a.startswith("--") else a for a in args],
                      name)


def architecture_task(model: Path) -> str | None:
    """The task vLLM derives from config.json's first architecture; None if unreadable."""
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    return next((task for suffix, task in _SUFFIXES if archs[0].endswith(suffix)), None)


def task_of(model: Path, args: Sequence[str], backend: str = "vllm") -> str:
    """GENERATE, EMBED or CLASSIFY: what the server will serve this model as."""
    if backend != "vllm":
        return GENERATE  # vllm-mlx serves generation (its embeddings model is separate)
    runner, convert = _flag(args, "--runner"), _flag(args, "--convert")
    task = _flag(args, "--task")
    if runner == "generate":
        return GENERATE
    if convert in (EMBED, "reward"):
        return EMBED
    if convert == CLASSIFY:
        return CLASSIFY
    if task in _POOLING_TASKS:
        return _POOLING_TASKS[task]
    arch = architecture_task(model)
    if runner == "pooling":
        # The pooling runner on a generative architecture converts it to embeddings.
        return arch if arch in (EMBED, CLASSIFY) else EMBED
    return arch or GENERATE


def is_pooling(model: Path, args: Sequence[str], backend: str = "vllm") -> bool:
    """True when the server serves the model as a pooling model (no text generation)."""
    return task_of(model, args, backend) != GENERATE


# Routes that generate text: vLLM 0.32 does not serve them for a pooling model (seen here: a
# chat completion or a Messages request to `--runner pooling --convert embed` answers its own
# `{"detail":"Not Found"}`).
_GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages",
                      "/v1/responses")


def serves(task: str, path: str) -> bool:
    """Whether a model served as `task` answers the API route `path` (a raw path)."""
    if task == GENERATE:
        return True
    return not any(path == r or path.startswith(r + "/") for r in _GENERATION_ROUTES)
