"""Model folders for tests: a small real model, and the same laid out as a Hugging Face cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

WEIGHTS = "model.safetensors"


def make_model(root: Path) -> Path:
    """A small model folder: a real safetensors file, configs, a nested and a hidden file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    save_file({"embed": rng.standard_normal((64, 32)).astype(np.float32),
               "norm": np.ones(32, dtype=np.float16)}, str(root / WEIGHTS))
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (root / "sub").mkdir()
    (root / "sub" / "chat_template.jinja").write_text("{{ messages }}\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return root


def make_hf_cache(hub: Path) -> Path:
    """A hub cache repo as huggingface_hub lays it out; returns the snapshot folder."""
    repo = hub / "models--org--tiny"
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / ("0123abcd" * 5)
    blobs.mkdir(parents=True)
    (snapshot / "sub").mkdir(parents=True)
    source = make_model(hub.parent / "source")
    for path in source.rglob("*"):
        if path.is_file():
            blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copy(path, blob)
            link = snapshot / path.relative_to(source)
            depth = len(link.relative_to(repo).parts) - 1
            link.symlink_to(Path(*([".."] * depth), "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot
