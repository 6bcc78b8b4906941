"""The weights manifest: shasum compatibility, every kind of tampering, path safety, HF caches."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sovereignd.errors import CheckFailed, ManifestError
from sovereignd.integrity import manifest
from sovereignd.integrity.manifest import Status
from tests.helpers import run_cli
from tests.modeldirs import WEIGHTS, make_hf_cache, make_model

SHASUM = shutil.which("shasum")
SHA256SUM = shutil.which("sha256sum")
needs_shasum = pytest.mark.skipif(SHASUM is None, reason="shasum (perl) is not installed")
needs_sha256sum = pytest.mark.skipif(SHA256SUM is None, reason="sha256sum is not installed")

def reference_manifest(root: Path, tool: list[str]) -> bytes:
    """What `find . -type f | LC_ALL=C sort | xargs TOOL` writes from inside the model folder."""
    cmd = (f"find . -type f ! -name {manifest.DEFAULT_NAME} -print0 | LC_ALL=C sort -z "
           f"| xargs -0 {' '.join(tool)}")
    return subprocess.run(cmd, shell=True, cwd=root, capture_output=True, check=True,  # noqa: S602 - fixed pipeline
                          env={**os.environ, "LC_ALL": "C"}).stdout


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")


@pytest.fixture
def approved(model: Path) -> Path:
    """The model with its manifest written by `sovereignd manifest create`'s library call."""
    created = manifest.create_manifest(model)
    manifest.write_manifest(model / manifest.DEFAULT_NAME, created.manifest)
    return model


def verify(model: Path, **kwargs: object) -> manifest.VerifyReport:
    approved_manifest = manifest.read_manifest(model / manifest.DEFAULT_NAME)
    return manifest.verify_manifest(model, approved_manifest, **kwargs)  # type: ignore[arg-type]


def statuses(report: manifest.VerifyReport) -> dict[str, Status]:
    return {r.path: r.status for r in report.results if r.status is not Status.OK}


# --- format compatibility ----------------------------------------------------------------------


@needs_shasum
@needs_sha256sum
def test_written_manifest_is_byte_identical_to_shasum_and_sha256sum(model: Path) -> None:
    # Names that need escaping or careful sorting, as shasum and sha256sum handle them.
    for name in ("with space", "back\\slash", "new\nline", "uni\u20ac", "a.b", "a-b"):
        (model / name).write_bytes(name.encode())
    (model / "a").mkdir()
    (model / "a" / "b").write_bytes(b"nested")
    created = manifest.create_manifest(model)
    ours = created.manifest.render()
    assert ours == reference_manifest(model, ["shasum", "-a", "256"])
    assert ours == reference_manifest(model, ["sha256sum"])
    assert created.bytes_hashed == sum(p.stat().st_size for p in model.rglob("*") if p.is_file())


@needs_shasum
@needs_sha256sum
def test_our_manifest_passes_shasum_c_and_sha256sum_c(approved: Path) -> None:
    for tool in (["shasum", "-a", "256", "-c", "--strict"], ["sha256sum", "-c", "--strict"]):
        result = subprocess.run([*tool, manifest.DEFAULT_NAME], cwd=approved,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_shasum
@needs_sha256sum
@pytest.mark.parametrize("tool", [["shasum", "-a", "256"], ["sha256sum"], ["sha256sum", "-b"],
                                  ["shasum", "-a", "256", "-b"]],
                         ids=["shasum", "sha256sum", "sha256sum-b", "shasum-b"])
def test_manifest_written_by_the_system_tools_verifies(model: Path, tool: list[str]) -> None:
    (model / manifest.DEFAULT_NAME).write_bytes(reference_manifest(model, tool))
    report = verify(model)
    assert report.ok, report.lines()
    assert len(report.results) == 5


@needs_sha256sum
def test_manifest_without_dot_slash_verifies(model: Path) -> None:
    # `sha256sum *` in the folder writes bare names.
    names = sorted(p.name for p in model.iterdir() if p.is_file())
    data = subprocess.run(["sha256sum", *names, "sub/chat_template.jinja"], cwd=model,
                          capture_output=True, check=True).stdout
    assert b"  ./" not in data
    (model / manifest.DEFAULT_NAME).write_bytes(data)
    assert verify(model).ok


def test_comments_blank_lines_crlf_and_upper_case_hex_are_read(approved: Path) -> None:
    path = approved / manifest.DEFAULT_NAME
    lines = path.read_bytes().splitlines()
    odd = [b"# approved 2026-11-22 by ops", b""]
    odd += [(ln[:64].upper() + ln[64:] + b"\r") for ln in lines]
    path.write_bytes(b"\n".join(odd) + b"\n")
    assert verify(approved).ok


# --- malformed manifests --------------------------------------------------------------------------

GOOD = "a" * 64


@pytest.mark.parametrize(("text", "line", "message"), [
    (f"{GOOD}  ./ok\nnot-hex!  ./x\n", 2, "not a hexadecimal digest"),
    (f"{'a' * 40}  ./x\n", 1, "has 40 hex digits"),
    (f"{GOOD}./x\n", 1, "expected '<64 hex digits>  <path>'"),
    (f"{GOOD}\n", 1, "expected '<64 hex digits>  <path>'"),
    (f"{GOOD} -./x\n", 1, "two spaces"),
    (f"{GOOD}  \n", 1, "no path"),
    (f"{GOOD}  ./a/../../etc/passwd\n", 1, "leaves the model folder"),
    (f"{GOOD}  ../x\n", 1, "leaves the model folder"),
    (f"{GOOD}  /etc/passwd\n", 1, "absolute path"),
    (f"\n{GOOD}  ./x\n{GOOD}  x\n", 3, r"listed twice \(first at line 2\)"),
    (f"{GOOD}  ./\n", 1, "names the model folder itself"),
    (f"{GOOD} ^./x\n", 1, "universal-newlines"),
    (f"SHA256 (./x) = {GOOD}\n", 1, "--tag"),
    (f"\\{GOOD}  ./a\\tb\n", 1, "unknown escape"),
], ids=["bad-hex", "sha1-length", "no-separator", "no-path-at-all", "bad-mode", "empty-path",
        "dotdot-inside", "dotdot", "absolute", "duplicate", "folder-itself", "universal-mode",
        "bsd-tag", "bad-escape"])
def test_malformed_manifest_names_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        manifest.parse_manifest(text.encode(), "CHECKSUMS.sha256")
    assert caught.value.line == line
    assert f"CHECKSUMS.sha256, line {line}: " in str(caught.value)


def test_empty_manifest_is_an_error() -> None:
    with pytest.raises(ManifestError, match="lists no files"):
        manifest.parse_manifest(b"# nothing\n\n")


def test_cli_malformed_manifest_exits_1_with_the_line(model: Path) -> None:
    (model / manifest.DEFAULT_NAME).write_text(f"{GOOD}  ./config.json\n{GOOD}  ../x\n")
    result = run_cli("manifest", "verify", str(model))
    assert result.returncode == 1
    assert "line 2" in result.stderr and "leaves the model folder" in result.stderr


def test_cli_missing_manifest_says_how_to_make_one(model: Path) -> None:
    result = run_cli("manifest", "verify", str(model))
    assert result.returncode == 1
    assert "sovereignd manifest create" in result.stderr


# --- tampering ------------------------------------------------------------------------------------


def _flip_byte(m: Path) -> None:
    data = bytearray((m / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (m / WEIGHTS).write_bytes(bytes(data))


def _append(m: Path) -> None:
    with (m / WEIGHTS).open("ab") as f:
        f.write(b"\0")


def _truncate(m: Path) -> None:
    os.truncate(m / WEIGHTS, (m / WEIGHTS).stat().st_size - 100)


def _delete(m: Path) -> None:
    (m / "config.json").unlink()


def _rename(m: Path) -> None:
    (m / "config.json").rename(m / "config.json.bak")


def _extra(m: Path) -> None:
    (m / "notes.txt").write_text("hello\n")


def _inject_py(m: Path) -> None:
    (m / "modeling_evil.py").write_text("import os\n")


def _symlink_outside(m: Path) -> None:
    outside = m.parent / "outside.json"
    outside.write_bytes((m / "config.json").read_bytes())  # same bytes: only the link is wrong
    (m / "config.json").unlink()
    (m / "config.json").symlink_to(outside)


TAMPERING: dict[str, tuple[Callable[[Path], None], dict[str, Status]]] = {
    "flip-byte": (_flip_byte, {WEIGHTS: Status.FAILED}),
    "append": (_append, {WEIGHTS: Status.FAILED}),
    "truncate": (_truncate, {WEIGHTS: Status.FAILED}),
    "delete": (_delete, {"config.json": Status.MISSING}),
    "rename": (_rename, {"config.json": Status.MISSING, "config.json.bak": Status.EXTRA}),
    "extra-file": (_extra, {"notes.txt": Status.EXTRA}),
    "injected-py": (_inject_py, {"modeling_evil.py": Status.EXTRA}),
    "symlink-outside": (_symlink_outside, {"config.json": Status.UNSAFE}),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected_by_verify(approved: Path, case: str) -> None:
    tamper, expected = TAMPERING[case]
    assert verify(approved).ok
    tamper(approved)
    report = verify(approved)
    assert not report.ok
    assert statuses(report) == expected


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected_by_the_cli(approved: Path, case: str) -> None:
    tamper, expected = TAMPERING[case]
    tamper(approved)
    result = run_cli("manifest", "verify", str(approved), "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    printed = {ln.split(": ", 1)[0]: ln.split(": ", 1)[1].split(" ", 1)[0]
               for ln in result.stdout.splitlines()}
    assert printed == {f"./{p}": str(s) for p, s in expected.items()}
    assert "not OK" in result.stderr


def test_cli_verify_ok_prints_shasum_style_lines_and_exits_0(approved: Path) -> None:
    result = run_cli("manifest", "verify", str(approved))
    assert result.returncode == 0, result.stderr
    assert "./config.json: OK" in result.stdout.splitlines()
    assert "5 file(s): 5 OK" in result.stderr


def test_failed_file_shows_both_digests(approved: Path) -> None:
    expected = hashlib.sha256((approved / "config.json").read_bytes()).hexdigest()
    (approved / "config.json").write_text("{}\n")
    (line,) = verify(approved).problems
    assert line.expected == expected
    assert line.actual == hashlib.sha256(b"{}\n").hexdigest()
    assert f"expected {expected}, got {line.actual}" in line.render()


def test_truncated_safetensors_failure_says_what_the_header_says(approved: Path) -> None:
    _truncate(approved)
    (result,) = verify(approved).problems
    assert result.detail.startswith("truncated: header says data ends at")


def test_fifo_in_the_model_folder_is_unsafe_and_does_not_hang(approved: Path) -> None:
    os.mkfifo(approved / "pipe")
    assert statuses(verify(approved)) == {"pipe": Status.UNSAFE}


def test_listed_file_replaced_by_a_folder_is_unsafe(approved: Path) -> None:
    (approved / "config.json").unlink()
    (approved / "config.json").mkdir()
    assert statuses(verify(approved)) == {"config.json": Status.UNSAFE}


def test_folder_symlink_is_not_followed(approved: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (approved / "linked").symlink_to(tmp_path / "elsewhere")
    result = statuses(verify(approved))
    assert result == {"linked": Status.UNSAFE}


def test_symlink_inside_the_model_folder_is_followed(model: Path) -> None:
    (model / "config-link.json").symlink_to("config.json")
    created = manifest.create_manifest(model)
    assert created.manifest.digests["config-link.json"] == created.manifest.digests["config.json"]


def test_allowed_roots_let_a_symlink_point_outside(model: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tokenizer.model").write_bytes(b"spm")
    (model / "tokenizer.model").symlink_to(shared / "tokenizer.model")
    with pytest.raises(CheckFailed, match="outside the model folder"):
        manifest.create_manifest(model)
    created = manifest.create_manifest(model, allowed_roots=[shared])
    manifest.write_manifest(model / manifest.DEFAULT_NAME, created.manifest)
    assert verify(model, allowed_roots=[shared]).ok
    assert statuses(verify(model)) == {"tokenizer.model": Status.UNSAFE}


def test_create_refuses_a_corrupt_safetensors_file(model: Path) -> None:
    _truncate(model)
    with pytest.raises(CheckFailed, match=r"(?s)safetensors file.*truncated"):
        manifest.create_manifest(model)


def test_manifest_and_its_temporary_siblings_are_not_extra(approved: Path) -> None:
    (approved / f".{manifest.DEFAULT_NAME}.abc123.tmp").write_text("half-written")
    assert verify(approved).ok


def test_manifest_listing_itself_is_not_checked(model: Path) -> None:
    # `find . -type f | xargs shasum -a 256 > CHECKSUMS.sha256` lists the manifest half-written.
    (model / manifest.DEFAULT_NAME).write_bytes(b"")
    data = manifest.create_manifest(model, manifest_path=model / "elsewhere").manifest.render()
    (model / manifest.DEFAULT_NAME).write_bytes(data)
    assert "./CHECKSUMS.sha256" in data.decode()
    assert verify(model).ok


def test_bookkeeping_folders_are_not_listed(model: Path) -> None:
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "download.lock").write_text("")
    (model / ".git").mkdir()
    (model / ".git" / "index").write_text("")
    (model / ".cache" / "other").write_text("kept")
    listed = manifest.create_manifest(model).manifest.digests
    assert ".cache/other" in listed and ".gitattributes" in listed
    assert not [p for p in listed if p.startswith((".git/", ".cache/huggingface"))]


def test_manifest_elsewhere_makes_a_stray_default_manifest_extra(model: Path,
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "approved.sha256"
    manifest.write_manifest(target, manifest.create_manifest(model,
                                                             manifest_path=target).manifest)
    (model / manifest.DEFAULT_NAME).write_text("")
    report = manifest.verify_manifest(model, manifest.read_manifest(target),
                                      manifest_path=target)
    assert statuses(report) == {manifest.DEFAULT_NAME: Status.EXTRA}


# --- Hugging Face hub cache ---------------------------------------------------------------------


def test_hf_cache_snapshot_symlinks_into_blobs_are_followed(tmp_path: Path) -> None:
    snapshot = make_hf_cache(tmp_path / "hub")
    assert manifest.hf_cache_repo(snapshot) == snapshot.parent.parent
    target = tmp_path / "hf.sha256"
    created = manifest.create_manifest(snapshot, manifest_path=target)
    assert set(created.manifest.digests) == {WEIGHTS, "config.json", "tokenizer.json",
                                             "sub/chat_template.jinja", ".gitattributes"}
    manifest.write_manifest(target, created.manifest)
    result = run_cli("manifest", "verify", str(snapshot), "--manifest", str(target))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hf_cache_symlink_to_another_repo_is_unsafe(tmp_path: Path) -> None:
    snapshot = make_hf_cache(tmp_path / "hub")
    target = tmp_path / "hf.sha256"
    manifest.write_manifest(target, manifest.create_manifest(snapshot,
                                                             manifest_path=target).manifest)
    other = tmp_path / "hub" / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    (other / "x").write_bytes((snapshot / "config.json").read_bytes())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(other / "x")
    report = manifest.verify_manifest(snapshot, manifest.read_manifest(target),
                                      manifest_path=target)
    assert statuses(report) == {"config.json": Status.UNSAFE}


def test_broken_hf_symlink_is_missing(tmp_path: Path) -> None:
    snapshot = make_hf_cache(tmp_path / "hub")
    target = tmp_path / "hf.sha256"
    manifest.write_manifest(target, manifest.create_manifest(snapshot,
                                                             manifest_path=target).manifest)
    (snapshot / "config.json").resolve().unlink()
    report = manifest.verify_manifest(snapshot, manifest.read_manifest(target),
                                      manifest_path=target)
    (problem,) = report.problems
    assert problem.status is Status.MISSING and "broken symlink" in problem.detail


# --- subsets, stat snapshots, the pin ------------------------------------------------------------


def test_subset_verifies_only_the_touched_paths(approved: Path) -> None:
    _flip_byte(approved)
    (approved / "sub" / "new.py").write_text("x = 1\n")
    only_config = verify(approved, paths=["config.json"])
    assert [(r.path, r.status) for r in only_config.results] == [("config.json", Status.OK)]
    weights_abs = verify(approved, paths=[approved / WEIGHTS])
    assert statuses(weights_abs) == {WEIGHTS: Status.FAILED}
    folder = verify(approved, paths=[approved / "sub"])
    assert {r.path: r.status for r in folder.results} == {
        "sub/chat_template.jinja": Status.OK, "sub/new.py": Status.EXTRA}
    gone = verify(approved, paths=["deleted-extra.bin", approved.parent / "elsewhere"])
    assert gone.results == () and gone.ok
    assert len(verify(approved, paths=[approved]).results) == 6


def test_subset_reports_a_deleted_listed_file(approved: Path) -> None:
    _delete(approved)
    assert statuses(verify(approved, paths=["./config.json"])) == {"config.json": Status.MISSING}


def test_stat_snapshot_notices_content_metadata_and_membership_changes(approved: Path) -> None:
    before = manifest.stat_snapshot(approved)
    assert set(before) == {WEIGHTS, "config.json", "tokenizer.json", "sub/chat_template.jinja",
                           ".gitattributes"}
    assert manifest.changed_paths(before, manifest.stat_snapshot(approved)) == []
    st = (approved / "config.json").stat()
    (approved / "config.json").write_text('{"architectures": ["EvilForCausalLM"]}\n')
    os.utime(approved / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the mtime
    (approved / "tokenizer.json").chmod(0o600)
    (approved / "sub" / "chat_template.jinja").unlink()
    (approved / "added.py").write_text("")
    after = manifest.stat_snapshot(approved)
    assert manifest.changed_paths(before, after) == [
        "added.py", "config.json", "sub/chat_template.jinja", "tokenizer.json"]


def test_manifest_pin(approved: Path) -> None:
    path = approved / manifest.DEFAULT_NAME
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.check_manifest_pin(path, digest.upper()) == digest
    with pytest.raises(ManifestError, match="changed after it was approved"):
        manifest.check_manifest_pin(path, "0" * 64)
    assert manifest.read_manifest(path).sha256 == digest


def test_cli_create_writes_the_default_manifest_and_prints_its_digest(model: Path) -> None:
    result = run_cli("manifest", "create", str(model), "--workers", "2")
    assert result.returncode == 0, result.stderr
    written = (model / manifest.DEFAULT_NAME).read_bytes()
    assert hashlib.sha256(written).hexdigest() in result.stderr
    assert "5 files" in result.stderr
    assert run_cli("manifest", "verify", str(model)).returncode == 0


def test_cli_create_refuses_an_unsafe_symlink(model: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    (model / "link").symlink_to(tmp_path / "secret")
    result = run_cli("manifest", "create", str(model), "-o", str(tmp_path / "m.sha256"))
    assert result.returncode == 1
    assert "./link: symlink to" in result.stderr and "--allowed-root" in result.stderr
    assert not (tmp_path / "m.sha256").exists()
    ok = run_cli("manifest", "create", str(model), "-o", str(tmp_path / "m.sha256"),
                 "--allowed-root", str(tmp_path))
    assert ok.returncode == 0, ok.stderr


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("manifest", "create", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_file_vanishing_between_listing_and_hashing_is_missing(
        approved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = manifest.hashing.hash_files_report

    def delete_then_hash(paths: object, *args: object, **kwargs: object) -> object:
        (approved / "config.json").unlink()  # a race the daemon can meet on every check
        return real(paths, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(manifest.hashing, "hash_files_report", delete_then_hash)
    (problem,) = verify(approved).problems
    assert (problem.path, problem.status) == ("config.json", Status.MISSING)
    assert problem.detail == "disappeared during the check"


def test_a_failed_check_whose_output_is_cut_never_exits_zero(tmp_path: Path) -> None:
    """`sovereignd manifest verify ... | head`: the reader left before the verdict, so the
    exit status is SIGPIPE's 141, never 0 (a tampered folder must not pass under pipefail)."""
    from tests.helpers import cli_argv, cli_env

    model = tmp_path / "model"
    model.mkdir()
    for i in range(300):
        (model / f"f{i:03}.bin").write_bytes(b"x" * 10)
    created = run_cli("manifest", "create", str(model))
    assert created.returncode == 0, created.stderr
    (model / "f000.bin").write_bytes(b"changed")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(cli_argv("manifest", "verify", str(model)), stdout=write,
                               stderr=subprocess.PIPE, env=cli_env(), timeout=60,
                               check=False)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert b"Traceback" not in proc.stderr
