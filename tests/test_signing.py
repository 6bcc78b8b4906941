"""Signed models: real OpenSSF Model Signing signatures (EC P-256 keys made by openssl), verified
offline before every start and by `check`; each tamper kind refused or quarantined."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereignd.integrity import signing
from tests.harness import Daemon
from tests.helpers import run_cli, wait_for
from tests.signing_support import MODEL_SIGNING, edit_payload, make_key, sign

MakeDaemon = Callable[..., Daemon]
WEIGHTS = "model.bin"


def model_files(model: Path) -> None:
    model.mkdir(parents=True, exist_ok=True)
    (model / WEIGHTS).write_bytes(os.urandom(256 * 1024))
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "sub").mkdir(exist_ok=True)
    (model / "sub" / "extra.json").write_text("{}")


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    model_files(model)
    private, public = make_key(tmp_path, "publisher")
    _, other = make_key(tmp_path, "other")
    sig = model / "model.sig"
    sign(model, private, sig)
    return {"model": model, "private": private, "public": public, "other": other, "sig": sig}


# --- the signature itself ---------------------------------------------------------------------


def test_a_real_signature_verifies_and_yields_the_signed_digests(
        signed: dict[str, Path]) -> None:
    s = signing.verify(signed["sig"], public_key=signed["public"])
    assert set(s.manifest.digests) == {WEIGHTS, "config.json", "tokenizer.json",
                                       "sub/extra.json"}
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(signed["public"]),
                          "-outform", "DER"], check=True, capture_output=True).stdout
    assert s.key_fingerprint == hashlib.sha256(der).hexdigest()
    assert s.signer == f"EC P-256 key SHA256:{s.key_fingerprint}"
    assert "model.sig" in s.ignore_paths and s.allow_symlinks is False
    assert s.manifest.digests[WEIGHTS] == hashlib.sha256(
        (signed["model"] / WEIGHTS).read_bytes()).hexdigest()


def test_another_key_is_refused_in_the_operators_words(signed: dict[str, Path]) -> None:
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["other"])
    assert "was not made with the private key of integrity.public_key" in str(err.value)


def test_an_edited_signature_is_refused(signed: dict[str, Path]) -> None:
    edit_payload(signed["sig"])
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["public"])
    assert "does not verify" in str(err.value) and "edited" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not json", b"{}", b'{"verificationMaterial": 1}',
                                     b"\xff\xfe", b"[1, 2]"])
def test_malformed_signature_files_give_a_clear_error(signed: dict[str, Path],
                                                      content: bytes) -> None:
    signed["sig"].write_bytes(content)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["public"])
    assert f"the signature {signed['sig']}" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"-----BEGIN PUBLIC KEY-----\nnope\n"
                                     b"-----END PUBLIC KEY-----\n", b"garbage"])
def test_malformed_keys_give_a_clear_error(signed: dict[str, Path], content: bytes) -> None:
    signed["public"].write_bytes(content)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["public"])
    assert "is not a PEM elliptic-curve public key" in str(err.value)


def test_an_rsa_key_is_refused_clearly(signed: dict[str, Path], tmp_path: Path) -> None:
    rsa = tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                    "rsa_keygen_bits:2048", "-out", str(rsa)], check=True, capture_output=True)
    pub = subprocess.run(["openssl", "pkey", "-in", str(rsa), "-pubout"], check=True,
                         capture_output=True).stdout
    signed["public"].write_bytes(pub)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["public"])
    assert "elliptic-curve" in str(err.value)


def test_a_missing_signature_file_is_named(signed: dict[str, Path]) -> None:
    signed["sig"].unlink()
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(signed["sig"], public_key=signed["public"])
    assert "cannot read the signature" in str(err.value)


def test_a_certificate_signature_verifies_against_its_chain_and_names_the_subject(
        tmp_path: Path) -> None:
    """`model_signing sign certificate` with a CA and a leaf made by openssl in the test."""
    model = tmp_path / "model"
    model_files(model)
    ca_key, _ = make_key(tmp_path, "ca")
    leaf_key, _ = make_key(tmp_path, "leaf")
    ca, leaf, ext = tmp_path / "ca.crt", tmp_path / "leaf.crt", tmp_path / "leaf.ext"
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(ca_key), "-subj",
                    "/CN=Approving Org Root", "-days", "2", "-out", str(ca),
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign"],
                   check=True, capture_output=True)
    csr = tmp_path / "leaf.csr"
    subprocess.run(["openssl", "req", "-new", "-key", str(leaf_key), "-subj",
                    "/O=Approving Org/CN=model signer", "-out", str(csr)],
                   check=True, capture_output=True)
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=codeSigning\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey",
                    str(ca_key), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                    "-out", str(leaf)], check=True, capture_output=True)
    sig = model / "model.sig"
    res = subprocess.run([str(MODEL_SIGNING), "sign", "certificate", str(model),
                          "--private_key", str(leaf_key), "--signing_certificate", str(leaf),
                          "--certificate_chain", str(ca), "--signature", str(sig)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    s = signing.verify(sig, certificate_chain=(ca,))
    assert s.method == "certificate"
    assert "CN=model signer" in s.signer and "O=Approving Org" in s.signer
    other_ca_key, _ = make_key(tmp_path, "other-ca")
    other_ca = tmp_path / "other-ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", str(other_ca_key), "-subj",
                    "/CN=Someone Else", "-days", "2", "-out", str(other_ca)],
                   check=True, capture_output=True)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify(sig, certificate_chain=(other_ca,))
    assert "does not chain to integrity.certificate_chain" in str(err.value)


# --- configuration ------------------------------------------------------------------------------


def _config(tmp_path: Path, integrity: str) -> Path:
    model = tmp_path / "model"
    path = tmp_path / "c.yaml"
    path.write_text(f"server:\n  model: {model}\n  command: [/bin/true]\nlogs:\n  dir: "
                    f"{tmp_path / 'logs'}\nintegrity:\n{integrity}")
    return path


@pytest.mark.parametrize(("integrity", "expected"), [
    ("  signature: /x/model.sig\n", "set exactly one of integrity.public_key"),
    ("  signature: /x/model.sig\n  public_key: /k.pub\n  certificate_chain: [/ca.pem]\n",
     "set exactly one of integrity.public_key"),
    ("  public_key: /k.pub\n", "integrity.public_key: set integrity.signature too"),
    ("  signature: /x/model.sig\n  public_key: /k.pub\n  manifest: /m.sha256\n",
     "not both"),
])
def test_signature_settings_are_checked_together(tmp_path: Path, integrity: str,
                                                 expected: str) -> None:
    res = run_cli("check", "--config", str(_config(tmp_path, integrity)))
    assert res.returncode == 78
    assert expected in res.stderr


# --- the daemon ---------------------------------------------------------------------------------


def signed_daemon(make_daemon: MakeDaemon, *, key: str = "publisher") -> Daemon:
    """A daemon serving a model signed by `publisher`, verified with `key`'s public key."""
    d = make_daemon()
    model_files(d.model)
    private, _ = make_key(d.root, "publisher")
    make_key(d.root, "other")
    sign(d.model, private, d.model / "model.sig")
    d.cfg.setdefault("integrity", {}).update(
        {"signature": str(d.model / "model.sig"), "public_key": str(d.root / f"{key}.pub"),
         "stat_interval": "500ms"})
    d.write_config()
    return d


def quarantined(d: Daemon, words: str, timeout: float = 10) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, body = d.get("/readyz")
        if code == 503 and body["state"] == "QUARANTINED" and words in body["reason"]:
            return dict(body)
        return None

    return wait_for(check, timeout, what=f"QUARANTINED saying {words}")


def test_a_signed_model_serves_and_status_names_the_signer(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    d.start()
    st = d.wait_state("READY")
    assert st["integrity"]["result"] == "ok"
    assert st["integrity"]["signer"].startswith("EC P-256 key SHA256:")
    assert st["integrity"]["signature"] == str(d.model / "model.sig")
    ok = d.events("signature_verified")[-1]
    assert ok["result"] == "ok" and ok["files"] == 4 and ok["signing_method"] == "key"
    verified = d.events("integrity_verified")[-1]
    assert verified["signer"] == ok["signer"]


def test_another_key_means_no_start(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon, key="other")
    d.start()
    body = quarantined(d, "was not made with the private key of integrity.public_key")
    assert d.starts() == []
    assert "integrity baseline" in body["reason"]
    refused = d.events("signature_verified")[-1]
    assert refused["result"] == "refused"


def _flip(model: Path) -> str:
    data = bytearray((model / WEIGHTS).read_bytes())
    data[1000] ^= 0xFF
    (model / WEIGHTS).write_bytes(bytes(data))
    return WEIGHTS


def _add(model: Path) -> str:
    (model / "modeling_evil.py").write_text("import os\n")
    return "modeling_evil.py"


def _remove(model: Path) -> str:
    (model / "tokenizer.json").unlink()
    return "tokenizer.json"


def _symlink(model: Path) -> str:
    target = model.parent / "tokenizer-copy.json"
    target.write_bytes((model / "tokenizer.json").read_bytes())
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(target)
    return "tokenizer.json"


def _inside_symlink(model: Path) -> str:
    (model / "sub" / "copy.json").write_bytes((model / "sub" / "extra.json").read_bytes())
    (model / "sub" / "extra.json").unlink()
    (model / "sub" / "extra.json").symlink_to("copy.json")
    return "sub/extra.json"


def _edit_signature(model: Path) -> str:
    edit_payload(model / "model.sig")
    return "does not verify"


TAMPERS: dict[str, Callable[[Path], str]] = {
    "changed_byte": _flip, "added_file": _add, "removed_file": _remove,
    "symlink_outside": _symlink, "symlink_inside": _inside_symlink,
    "edited_signature": _edit_signature}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_each_tamper_before_the_start_means_no_start(make_daemon: MakeDaemon,
                                                     kind: str) -> None:
    d = signed_daemon(make_daemon)
    words = TAMPERS[kind](d.model)
    d.start()
    quarantined(d, words)
    assert d.starts() == []


def test_a_changed_byte_while_serving_quarantines_naming_the_file(
        make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    d.start()
    d.wait_state("READY")
    original = (d.model / WEIGHTS).read_bytes()
    _flip(d.model)
    body = quarantined(d, WEIGHTS)
    assert "weights differ" in body["reason"]
    drift = d.events("integrity_drift")[-1]
    assert any(f["path"] == WEIGHTS and f["status"] == "FAILED" for f in drift["files"])
    assert drift["signer"].startswith("EC P-256 key")
    (d.model / WEIGHTS).write_bytes(original)
    d.wait_state("READY")


def test_a_signature_edited_while_serving_is_refused_at_the_next_start(
        make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    d.start()
    d.wait_state("READY")
    edit_payload(d.model / "model.sig")
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    quarantined(d, "does not verify")
    assert len(d.starts()) == 1
    assert "does not verify" in d.events("integrity_baseline_unreadable")[-1]["error"]
    assert d.events("signature_verified")[-1]["result"] == "refused"


def test_a_restored_signature_releases_the_quarantine_without_an_operator(
        make_daemon: MakeDaemon) -> None:
    """The quarantine an unreadable signature caused ends when the signature verifies again:
    as for restored weights, no restart or re-baseline is needed (AIDE-style: the state follows
    the files)."""
    d = signed_daemon(make_daemon)
    d.start()
    d.wait_state("READY")
    sig = d.model / "model.sig"
    original = edit_payload(sig)
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    quarantined(d, "does not verify")
    tmp = sig.with_name("model.sig.restore")
    tmp.write_bytes(original)
    tmp.replace(sig)  # as an operator restores a file from a backup
    d.wait_state("READY", timeout=30)
    assert len(d.starts()) == 2
    readable = d.events("integrity_baseline_readable")
    assert readable and readable[-1]["path"] == str(sig)
    assert d.events("release")[-1]["guard"] == "integrity"


# --- check ---------------------------------------------------------------------------------------


def _check(d: Daemon) -> subprocess.CompletedProcess[str]:
    (d.model / "chat_template.jinja").write_text("{{ messages }}")
    sign(d.model, d.root / "publisher.pem", d.model / "model.sig")
    return run_cli("check", "--config", str(d.config_path))


def test_check_verifies_and_prints_the_signers_fingerprint(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    res = _check(d)
    fingerprint = signing.verify(d.model / "model.sig",
                                 public_key=d.root / "publisher.pub").key_fingerprint
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[  ok] model signature" in res.stdout
    assert f"signed by EC P-256 key SHA256:{fingerprint}" in res.stdout
    assert "[  ok] signed weights" in res.stdout


def test_check_exits_non_zero_for_another_key(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon, key="other")
    res = _check(d)
    assert res.returncode == 1
    assert "[FAIL] model signature" in res.stdout
    assert "was not made with the private key" in res.stdout


def test_check_exits_non_zero_for_an_edited_signature(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    _check(d)
    edit_payload(d.model / "model.sig")
    res = run_cli("check", "--config", str(d.config_path))
    assert res.returncode == 1
    assert "does not verify" in res.stdout


def test_check_exits_non_zero_for_a_model_the_signature_does_not_cover(
        make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    _check(d)
    _flip(d.model)
    _add(d.model)
    res = run_cli("check", "--config", str(d.config_path))
    assert res.returncode == 1
    assert "[FAIL] signed weights" in res.stdout
    assert f"FAILED {WEIGHTS}" in res.stdout and "EXTRA modeling_evil.py" in res.stdout


# --- audit ---------------------------------------------------------------------------------------


def test_the_audit_names_the_signature_and_signer_that_approved_the_weights(
        make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    d.start()
    st = d.wait_state("READY")
    signer = st["integrity"]["signer"]
    assert d.stop() == 0
    res = run_cli("audit", "--config", str(d.config_path), "--format", "json")
    assert res.returncode in (0, 1), res.stderr
    integrity = next(c for c in json.loads(res.stdout)["controls"] if c["id"] == "integrity")
    assert integrity["title"] == "Model weights against their signature"
    facts = integrity["evidence"]
    assert facts["signature"] == str(d.model / "model.sig")
    assert facts["signature_sha256"] == hashlib.sha256(
        (d.model / "model.sig").read_bytes()).hexdigest()
    tables = integrity["tables"]
    assert [r[:2] for r in tables["approvals"]["rows"]] == [
        [signer, facts["signature_sha256"]]]
    assert [r[1] for r in tables["signature_checks"]["rows"]] == ["ok"]
    assert integrity["verdict"] == "PASS", integrity["finding"]
    assert signer in integrity["finding"]


# --- signing on the connected machine -----------------------------------------------------------


def test_model_sign_writes_a_signature_model_signing_itself_verifies(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model_files(model)
    private, public = make_key(tmp_path, "org")
    res = run_cli("model", "sign", str(model), "--private-key", str(private))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 files signed by EC P-256 key SHA256:" in res.stderr
    verified = subprocess.run([str(MODEL_SIGNING), "verify", "key", str(model), "--public_key",
                               str(public), "--signature", str(model / "model.sig")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert signing.verify(model / "model.sig", public_key=public).manifest.digests.keys() == {
        WEIGHTS, "config.json", "tokenizer.json", "sub/extra.json"}


def test_model_sign_refuses_a_bad_private_key_clearly(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model_files(model)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    res = run_cli("model", "sign", str(model), "--private-key", str(bad))
    assert res.returncode != 0
    assert "is not a PEM elliptic-curve private key" in res.stderr
    assert not (model / "model.sig").exists()


def test_baseline_names_the_signature_that_approves_the_weights(make_daemon: MakeDaemon) -> None:
    d = signed_daemon(make_daemon)
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"weights: approved by the signature {d.model / 'model.sig'}" in res.stdout
    assert "EC P-256 key SHA256:" in res.stdout
    d.cfg["integrity"]["public_key"] = str(d.root / "other.pub")
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 1
    assert "was not made with the private key" in res.stderr


def transferred(make_daemon: MakeDaemon) -> tuple[Daemon, Path, Path]:
    """A model signed by its publisher and carried over with its signature beside it, on a
    daemon that serves under a checksum manifest: (daemon, signature, manifest path)."""
    d = make_daemon()
    model_files(d.model)
    private, _ = make_key(d.root, "publisher")
    make_key(d.root, "other")
    sig = d.root / "model.sig"
    sign(d.model, private, sig)
    target = d.root / "baseline" / "model.sha256"
    d.cfg["integrity"] = {"manifest": str(target)}
    d.write_config()
    return d, sig, target


def test_baseline_writes_the_manifest_from_a_verified_signature(
        make_daemon: MakeDaemon) -> None:
    """`baseline --from-signature`: the manifest holds exactly the signed digests, shasum -c
    accepts it, and the daemon serves under it."""
    d, sig, target = transferred(make_daemon)
    res = run_cli("baseline", "--config", str(d.config_path), "--from-signature", str(sig),
                  "--public-key", str(d.root / "publisher.pub"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"approved by the signature {sig}" in res.stdout
    assert "EC P-256 key SHA256:" in res.stdout
    signed_digests = signing.verify(sig, public_key=d.root / "publisher.pub").manifest.digests
    lines = target.read_text().splitlines()
    assert {ln.split("  ./", 1)[1]: ln.split("  ", 1)[0] for ln in lines} == dict(signed_digests)
    check = subprocess.run(["sha256sum", "-c", str(target)], cwd=d.model, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    d.start()
    d.wait_state("READY")


def test_baseline_from_signature_refuses_another_key_or_a_changed_folder_writing_nothing(
        make_daemon: MakeDaemon) -> None:
    d, sig, target = transferred(make_daemon)
    base = ["baseline", "--config", str(d.config_path), "--from-signature", str(sig)]
    res = run_cli(*base, "--public-key", str(d.root / "other.pub"))
    assert res.returncode == 1
    assert "was not made with the private key" in res.stderr
    assert not target.exists()
    changed = _flip(d.model)
    res = run_cli(*base, "--public-key", str(d.root / "publisher.pub"))
    assert res.returncode == 1
    assert "the folder is not what it signs" in res.stderr
    assert f"./{changed}" in res.stderr
    assert not target.exists()
    res = run_cli(*base)
    assert res.returncode == 78
    assert "needs exactly one of --public-key or --certificate-chain" in res.stderr
