"""Signed models: an OpenSSF Model Signing signature, verified offline, read as the manifest.

A signature file (`model_signing sign key|certificate MODEL --signature model.sig`, PyPI
`model-signing` 1.1) is a Sigstore bundle holding a DSSE envelope; its payload is an in-toto
statement whose `predicate.resources` list every file's SHA-256 and whose
`predicate.serialization` says how the files were chosen (`method`, `hash_type`,
`allow_symlinks`, `ignore_paths`). Source: github.com/sigstore/model-transparency,
`src/model_signing/_signing/signing.py` (`dsse_payload_to_manifest`) and `verifying.py`.

Here the library only checks the envelope's signature (an EC key, or a certificate chain; no
network, no transparency log); the file digests it signs then become a `manifest.Manifest`, so
the daemon's own parallel hashing, watch and scheduled re-hash check the model folder exactly as
they check a `shasum` manifest (changed, missing, extra files).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereignd.errors import ManifestError, SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.integrity import manifest

#: LAZY: model-signing, pyOpenSSL and cryptography are imported where a signature is read,
#: not when the daemon or the CLI starts (about 0.4 s of CPU that most commands never need).


class SignatureError(SovereigndError):
    """The signature, key or certificate chain cannot be read, or the signature does not verify
    (wrong key, edited signature file, a method this daemon does not check)."""


@dataclass(frozen=True)
class SignedModel:
    """What a verified signature approves."""

    #: The signed digests by relative path; `source` is the signature file, `sha256` its bytes'.
    manifest: manifest.Manifest
    #: "key" or "certificate".
    method: str
    #: The signer in the operator's words: "EC P-256 key SHA256:<hex>" or a certificate subject.
    signer: str
    #: SHA-256 of the signer's public key, DER SubjectPublicKeyInfo (as
    #: `openssl pkey -pubin -outform DER | sha256sum` prints it).
    key_fingerprint: str
    #: Whether the signer allowed symlinks in the model folder (`allow_symlinks`).
    allow_symlinks: bool
    #: Paths relative to the model folder that the signer left out (`ignore_paths`).
    ignore_paths: tuple[str, ...]
    #: The model's name in the signed statement (informative only).
    model_name: str

    def ignored(self, model_dir: Path) -> list[Path]:
        """The ignored paths as paths in `model_dir` (for manifest.verify_manifest's ignore)."""
        return [model_dir / p for p in self.ignore_paths]

    def fields(self) -> dict[str, Any]:
        """Status/event fields naming the signature and who signed it."""
        return {"signature": self.manifest.source, "signature_sha256": self.manifest.sha256,
                "signer": self.signer, "signing_method": self.method,
                "key_fingerprint": self.key_fingerprint}


def _fingerprint(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see LAZY

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _key_name(public_key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - see LAZY

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            public_key.curve.name, public_key.curve.name)
        return f"EC {curve} key"
    return "key"


def _read_signature(path: Path) -> tuple[Any, bytes]:
    from model_signing._signing import sign_sigstore_pb  # noqa: PLC0415 - see LAZY

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the signature {path}: {exc.strerror or exc}; sign "
                             "the model with `model_signing sign key MODEL_DIR --private_key "
                             "KEY --signature FILE`") from exc
    try:
        sig = sign_sigstore_pb.Signature.read(path)
        envelope = sig.bundle.dsse_envelope
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        why = str(exc) if isinstance(exc, ValueError) and str(exc) else type(exc).__name__
        raise SignatureError(f"the signature {path} is not a model-signing (Sigstore bundle) "
                             f"signature file: {why[:200]}") from exc
    if envelope is None or not envelope.signatures:
        raise SignatureError(f"the signature {path} holds no DSSE envelope with a signature")
    return sig, data


def verify(signature: Path, *, public_key: Path | None = None,
           certificate_chain: tuple[Path, ...] = ()) -> SignedModel:
    """Verify `signature` offline against a PEM public key or a PEM certificate chain.

    Returns the signed digests as a manifest. Raises SignatureError with an operator sentence
    when a file cannot be read or parsed, the signature was made by another key or its content
    was edited, the chain does not lead to the signing certificate, or the signature uses a
    method whose digests are not per-file SHA-256 (shards, BLAKE2). Blocking, milliseconds.
    """
    from cryptography import exceptions as crypto_exc  # noqa: PLC0415 - see LAZY
    from cryptography import x509  # noqa: PLC0415 - see LAZY
    from model_signing._signing import sign_certificate, sign_ec_key  # noqa: PLC0415 - see LAZY
    from OpenSSL import crypto  # noqa: PLC0415 - see LAZY

    sig, data = _read_signature(signature)
    material = sig.bundle.verification_material
    verifier: Any
    if public_key is not None:
        try:
            verifier = sign_ec_key.Verifier(public_key)
        except OSError as exc:
            raise SignatureError(f"cannot read integrity.public_key {public_key}: "
                                 f"{exc.strerror or exc}") from exc
        except (ValueError, TypeError, AttributeError) as exc:
            # model-signing 1.1.1 reads `.curve` of any key: an RSA key raises AttributeError.
            why = str(exc) if not isinstance(exc, AttributeError) else "not an EC key"
            raise SignatureError(f"integrity.public_key {public_key} is not a PEM elliptic-curve "
                                 f"public key (P-256, P-384 or P-521): {why}") from exc
        method = "key"
        key_obj = verifier._public_key
        fingerprint = _fingerprint(key_obj)
        signer = f"{_key_name(key_obj)} SHA256:{fingerprint}"
        hint = material.public_key.hint if material.public_key is not None else ""
        if not hint:
            # Old signatures carry no key hint; the library then prints a warning on stdout
            # (every daemon line must be JSON). The hint only names the key; the signature
            # itself is still checked below.
            material.public_key.hint = hashlib.sha256(
                key_obj.public_bytes(*_pem_spki())).hexdigest()
        wrong_key = (f"the signature {signature} was not made with the private key of "
                     f"integrity.public_key {public_key} ({signer})")
    elif certificate_chain:
        try:
            verifier = sign_certificate.Verifier(list(certificate_chain))
        except OSError as exc:
            raise SignatureError(f"cannot read integrity.certificate_chain: "
                                 f"{exc.strerror or exc}") from exc
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"integrity.certificate_chain is not a list of PEM "
                                 f"certificates: {exc}") from exc
        method = "certificate"
        try:
            leaf = x509.load_der_x509_certificate(
                material.x509_certificate_chain.certificates[0].raw_bytes)
        except (AttributeError, IndexError, ValueError, TypeError) as exc:
            raise SignatureError(f"the signature {signature} holds no signing certificate; was "
                                 "it made with `model_signing sign key`? Then configure "
                                 "integrity.public_key") from exc
        signer = f"certificate subject {leaf.subject.rfc4514_string()}"
        fingerprint = _fingerprint(leaf.public_key())
        wrong_key = (f"the signature {signature} does not verify with its certificate "
                     f"({signer}) and integrity.certificate_chain")
    else:
        raise SignatureError("integrity.signature needs integrity.public_key or "
                             "integrity.certificate_chain")
    try:
        signed = verifier.verify(sig)
    except crypto_exc.InvalidSignature as exc:
        raise SignatureError(f"{wrong_key}, or its content was edited after signing: the "
                             "signature does not verify. Do not serve this model; get the "
                             "signature and the signer's public key again") from exc
    except crypto.X509StoreContextError as exc:
        raise SignatureError(f"the signing certificate of {signature} does not chain to "
                             f"integrity.certificate_chain: {exc}") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        text = str(exc)
        if "Key mismatch" in text:
            raise SignatureError(f"{wrong_key}: the key named in the signature is another "
                                 "one. Do not serve this model; configure the public key of "
                                 "the organisation that signed it") from exc
        raise SignatureError(f"the signature {signature} verifies but its content is not a "
                             f"model-signing statement: {text[:200] or type(exc).__name__}"
                             ) from exc
    return _as_manifest(signed, signature, data, method=method, signer=signer,
                        fingerprint=fingerprint)


def _pem_spki() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see LAZY

    return serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def _as_manifest(signed: Any, signature: Path, data: bytes, *, method: str, signer: str,
                 fingerprint: str) -> SignedModel:
    params = signed.serialization_type
    if params.get("method") != "files":
        raise SignatureError(f"the signature {signature} was made with the "
                             f"{params.get('method')!r} serialization; sovereignd checks "
                             "per-file signatures: sign with the default (files) method")
    digests: dict[str, str] = {}
    for rd in signed.resource_descriptors():
        if rd.digest.algorithm != "sha256":
            raise SignatureError(f"the signature {signature} lists {rd.identifier} with a "
                                 f"{rd.digest.algorithm} digest; sovereignd checks SHA-256: "
                                 "sign with --hash_algorithm sha256 (the default)")
        try:
            rel = manifest.normalize_path(str(rd.identifier), str(signature))
        except ManifestError as exc:
            raise SignatureError(f"the signature {signature} lists an unsafe path: "
                                 f"{exc.reason}") from exc
        digests[rel] = rd.digest.digest_hex
    if not digests:
        raise SignatureError(f"the signature {signature} lists no files")
    ignore: list[str] = []
    for p in params.get("ignore_paths", ()):
        try:
            ignore.append(manifest.normalize_path(str(p), str(signature)))
        except ManifestError:
            continue  # a path outside the model folder leaves nothing in it out
    return SignedModel(
        manifest=manifest.Manifest(digests=digests, source=str(signature),
                                   sha256=hashlib.sha256(data).hexdigest()),
        method=method, signer=signer, key_fingerprint=fingerprint,
        allow_symlinks=bool(params.get("allow_symlinks", False)),
        ignore_paths=tuple(sorted(ignore)),
        model_name=str(signed.model_name))


def symlinked(model_dir: Path, rels: list[str]) -> list[str]:
    """Those of `rels` that are symlinks in `model_dir` (refused unless the signer allowed)."""
    return [rel for rel in rels if (model_dir / rel).is_symlink()]


def check_folder(signed: SignedModel, model_dir: Path, *, signature: Path,
                 allowed_roots: tuple[Path, ...] = (), workers: int = 0,
                 exclude: Path | None = None,
                 ) -> tuple[manifest.VerifyReport, list[manifest.FileResult]]:
    """Hash `model_dir` against the signed digests: the report, and the files that are not
    what the signature covers (changed, missing, extra, unsafe; symlinks unless the signer
    allowed them). `exclude`: a file of ours in the folder (a manifest being written) that
    is not counted as extra. Blocking: one hash of every file. Raises SovereigndError when
    the folder cannot be read."""
    result = manifest.verify_manifest(model_dir, signed.manifest,
                                      manifest_path=exclude or signature,
                                      allowed_roots=allowed_roots, workers=workers,
                                      ignore=[*signed.ignored(model_dir), signature])
    bad = [r for r in result.results if r.status != manifest.Status.OK]
    if not signed.allow_symlinks:
        links = set(symlinked(model_dir, [r.path for r in result.results
                                          if r.status == manifest.Status.OK]))
        bad += [r for r in result.results if r.path in links]
    return result, bad


def sign(model_dir: Path, private_key: Path, signature: Path) -> SignedModel:
    """Sign `model_dir` with a PEM EC private key, as `model_signing sign key` does (files
    method, SHA-256, the signature file and git files ignored), write the signature whole
    (temporary file + rename), and return what it approves (verified with the key's own
    public half). Raises SignatureError when the key cannot be used or the folder read."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see LAZY
    from model_signing import hashing as ms_hashing  # noqa: PLC0415 - see LAZY
    from model_signing._signing import sign_ec_key  # noqa: PLC0415 - see LAZY
    from model_signing._signing import signing as ms_signing  # noqa: PLC0415 - see LAZY

    if not model_dir.is_dir():
        raise SignatureError(f"model folder {model_dir} does not exist or is not a folder")
    try:
        signer = sign_ec_key.Signer(private_key)
    except OSError as exc:
        raise SignatureError(f"cannot read the private key {private_key}: "
                             f"{exc.strerror or exc}") from exc
    except TypeError as exc:
        raise SignatureError(f"the private key {private_key} is encrypted; sign with "
                             "`model_signing sign key --password` or decrypt a copy on the "
                             "signing machine") from exc
    except (ValueError, AttributeError) as exc:
        raise SignatureError(f"{private_key} is not a PEM elliptic-curve private key (P-256, "
                             "P-384 or P-521)") from exc
    lib: Any = ms_hashing  # the library's Config is untyped
    config = lib.Config().set_ignored_paths(paths=[signature], ignore_git_paths=True)
    try:
        statement = config.hash(model_dir)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot hash {model_dir}: {exc}") from exc
    signed: Any = signer.sign(ms_signing.Payload(statement))
    atomic_write(signature, signed.bundle.to_json().encode())
    with tempfile.TemporaryDirectory() as folder:
        public = Path(folder) / "signer.pub"
        public.write_bytes(signer._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return verify(signature, public_key=public)
