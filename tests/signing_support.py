"""Real model signatures for tests: EC keys made by openssl, signed by the model-signing CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def make_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-256 key pair made by openssl: (private PEM, public PEM)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                    "-out", str(private)], check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    return private, public


def sign(model: Path, private: Path, signature: Path) -> None:
    """Sign the model folder with the model-signing CLI, as a publisher does."""
    res = subprocess.run([str(MODEL_SIGNING), "sign", "key", str(model), "--private_key",
                          str(private), "--signature", str(signature)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def edit_payload(signature: Path) -> bytes:
    """Change one signed digest inside the signature file, leaving its signature bytes;
    returns the original bytes."""
    original = signature.read_bytes()
    bundle = json.loads(original)
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(
        json.dumps(payload).encode()).decode()
    signature.write_text(json.dumps(bundle))
    return original
