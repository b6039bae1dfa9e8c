"""install.sh, exercised in --root (staging) mode: layout, idempotence, uninstall, Vosk model installs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.support.deploy import (
    ENV_PATH,
    FAKE_MODEL_FILES,
    INSTALL_DIR,
    INSTALL_SH,
    LOG_DIR,
    MODEL_DIR,
    ROOT,
    STATE_DIR,
    UNIT_PATH,
    WANTS_LINK,
    make_fake_model,
    mode_of,
    run_install,
    serve_directory,
    sha256_of,
    stage,
    tar_model,
    tree_snapshot,
    zip_model,
)
from tests.support.nginx import self_signed_certificate

# What `install.sh` would touch on the real system; none of it may change during a staged run.
REAL_SYSTEM_PATHS = [
    Path("/etc/systemd/system/ai-dialogue-backend.service"),
    Path("/etc/ai-dialogue-backend"),
    Path("/opt/ai-dialogue-backend"),
    Path("/var/lib/ai-dialogue-backend"),
    Path("/var/log/ai-dialogue-backend"),
]


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    stage(root)
    return root


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "fake-model")


@pytest.fixture
def model_archive(tmp_path: Path, fake_model: Path) -> Path:
    served = tmp_path / "served"
    served.mkdir()
    return zip_model(fake_model, served / "vosk-model-test-0.1.zip")


def assert_model_installed(root: Path) -> None:
    model = root / MODEL_DIR
    installed = {str(p.relative_to(model)): p.read_bytes() for p in model.rglob("*") if p.is_file()}
    assert installed == FAKE_MODEL_FILES
    assert all(mode_of(p) == 0o644 for p in model.rglob("*") if p.is_file())
    assert all(mode_of(p) == 0o755 for p in [model, *model.rglob("*")] if p.is_dir())


def test_staged_install_lays_out_unit_env_file_code_and_directories(tmp_path: Path) -> None:
    before = {path: path.exists() for path in REAL_SYSTEM_PATHS}
    root = tmp_path / "root"
    root.mkdir()
    result = stage(root)

    unit = root / UNIT_PATH
    assert mode_of(unit) == 0o644
    unit_text = unit.read_text()
    assert "User=ai-dialogue\n" in unit_text
    assert "ExecStart=/opt/ai-dialogue-backend/.venv/bin/python -m server\n" in unit_text
    assert "EnvironmentFile=/etc/ai-dialogue-backend/env\n" in unit_text
    assert (root / WANTS_LINK).readlink() == Path("/etc/systemd/system/ai-dialogue-backend.service")

    env_file = root / ENV_PATH
    assert mode_of(env_file) == 0o600
    assert env_file.stat().st_uid == 0
    assert "OPENROUTER_API_KEY=\n" in env_file.read_text()

    app = root / INSTALL_DIR
    for name in ["config/settings.py", "server/__main__.py", "requirements.txt", "install.sh", "service"]:
        assert (app / name).exists(), name
    assert (app / "requirements.txt").read_bytes() == (ROOT / "requirements.txt").read_bytes()
    assert mode_of(app / "install.sh") == 0o755
    assert mode_of(app / "server" / "__main__.py") == 0o644
    for absent in ["tests", ".git", ".venv", "Makefile", "model/vosk-model"]:
        assert not (app / absent).exists(), absent
    assert not list(app.rglob("__pycache__"))
    assert (app / "model").is_dir()

    assert mode_of(root / STATE_DIR) == 0o750
    assert mode_of(root / LOG_DIR) == 0o750
    assert "no Vosk model" in result.stderr
    assert {path: path.exists() for path in REAL_SYSTEM_PATHS} == before


def test_second_run_changes_nothing(staged: Path) -> None:
    before = tree_snapshot(staged)
    result = stage(staged)
    assert tree_snapshot(staged) == before
    assert "wrote" not in result.stdout
    assert "installed" not in result.stdout


def test_existing_env_file_is_kept_and_its_mode_restored(staged: Path) -> None:
    env_file = staged / ENV_PATH
    env_file.write_text("OPENROUTER_API_KEY=sk-or-test-key\nPORT=9100\n")
    env_file.chmod(0o644)
    result = stage(staged)
    assert env_file.read_text() == "OPENROUTER_API_KEY=sk-or-test-key\nPORT=9100\n"
    assert mode_of(env_file) == 0o600
    assert "mode set back to 0600" in result.stderr
    assert "sk-or-test-key" not in (staged / UNIT_PATH).read_text()


def test_changed_project_file_is_updated_and_stale_files_are_removed(staged: Path) -> None:
    stale = staged / INSTALL_DIR / "server" / "removed_module.py"
    stale.write_text("old code\n")
    (staged / INSTALL_DIR / "config" / "settings.py").write_text("edited in place\n")
    result = stage(staged)
    assert not stale.exists()
    assert (staged / INSTALL_DIR / "config" / "settings.py").read_bytes() == (ROOT / "config/settings.py").read_bytes()
    assert "installed /opt/ai-dialogue-backend/server" in result.stdout


def test_custom_dir_and_user_are_written_into_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root, "--dir", "/srv/dialogue", "--user", "dialogsvc")
    unit_text = (root / UNIT_PATH).read_text()
    assert "/opt/ai-dialogue-backend" not in unit_text
    assert "WorkingDirectory=/srv/dialogue\n" in unit_text
    assert "ExecStart=/srv/dialogue/.venv/bin/python -m server\n" in unit_text
    assert "VOSK_MODEL_PATH=/srv/dialogue/model/vosk-model\n" in unit_text
    assert "User=dialogsvc\nGroup=dialogsvc\n" in unit_text
    assert (root / "srv/dialogue/server/__main__.py").is_file()
    assert not (root / INSTALL_DIR).exists()


def test_uninstall_keeps_config_and_data_and_purge_removes_them(staged: Path, fake_model: Path) -> None:
    stage(staged, "--model", str(fake_model))
    (staged / STATE_DIR / "state.db").write_text("kept")
    (staged / LOG_DIR / "server.log").write_text("kept")
    env_before = (staged / ENV_PATH).read_text()

    result = run_install("--root", str(staged), "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (staged / UNIT_PATH).exists()
    assert not (staged / WANTS_LINK).is_symlink()
    app = staged / INSTALL_DIR
    assert sorted(p.name for p in app.iterdir()) == ["model"]
    assert sorted(p.name for p in (app / "model").iterdir()) == ["vosk-model"]
    assert_model_installed(staged)
    assert (staged / ENV_PATH).read_text() == env_before
    assert (staged / STATE_DIR / "state.db").read_text() == "kept"
    assert (staged / LOG_DIR / "server.log").read_text() == "kept"

    result = run_install("--root", str(staged), "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    for path in [INSTALL_DIR, "etc/ai-dialogue-backend", STATE_DIR, LOG_DIR, UNIT_PATH]:
        assert not (staged / path).exists(), path
    leftovers = [p for p in staged.rglob("*") if not p.is_dir()]
    assert leftovers == []


def test_reinstall_after_uninstall_keeps_the_secrets(staged: Path) -> None:
    (staged / ENV_PATH).write_text("OPENROUTER_API_KEY=sk-or-kept\n")
    assert run_install("--root", str(staged), "--uninstall").returncode == 0
    stage(staged)
    assert (staged / ENV_PATH).read_text() == "OPENROUTER_API_KEY=sk-or-kept\n"
    assert (staged / UNIT_PATH).is_file()


def test_model_download_with_matching_sha256_is_unpacked(staged: Path, model_archive: Path) -> None:
    with serve_directory(model_archive.parent) as base_url:
        result = stage(
            staged, "--model", f"{base_url}/{model_archive.name}", "--sha256", sha256_of(model_archive), "--allow-http"
        )
    assert "SHA-256 verified" in result.stdout
    assert "UNVERIFIED" not in result.stderr
    assert_model_installed(staged)
    assert not list((staged / INSTALL_DIR / "model").glob(".incoming*"))


def test_model_download_with_wrong_sha256_installs_nothing(tmp_path: Path, model_archive: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    wrong = hashlib.sha256(b"something else").hexdigest()
    with serve_directory(model_archive.parent) as base_url:
        result = run_install(
            *("--root", str(root), "--no-venv", "--model", f"{base_url}/{model_archive.name}", "--sha256", wrong),
            "--allow-http",
        )
    assert result.returncode != 0
    assert "SHA-256 mismatch" in result.stderr
    assert sha256_of(model_archive) in result.stderr
    assert list(root.iterdir()) == []


def test_wrong_sha256_leaves_the_installed_model_untouched(staged: Path, fake_model: Path, tmp_path: Path) -> None:
    stage(staged, "--model", str(fake_model))
    before = tree_snapshot(staged)
    other = make_fake_model(tmp_path / "other-model")
    (other / "am" / "final.mdl").write_bytes(b"a different model")
    archive = zip_model(other, tmp_path / "other.zip")
    result = run_install(
        "--root", str(staged), "--no-venv", "--model", str(archive), "--sha256", hashlib.sha256(b"x").hexdigest()
    )
    assert result.returncode != 0
    assert tree_snapshot(staged) == before


def test_an_archive_without_sha256_is_refused_unless_explicitly_skipped(tmp_path: Path, model_archive: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with serve_directory(model_archive.parent) as base_url:
        url = f"{base_url}/{model_archive.name}"
        refused = run_install("--root", str(root), "--no-venv", "--model", url, "--allow-http")
        assert refused.returncode != 0
        assert "needs --sha256" in refused.stderr
        assert list(root.iterdir()) == []
        refused_local = run_install("--root", str(root), "--no-venv", "--model", str(model_archive))
        assert refused_local.returncode != 0
        assert "needs --sha256" in refused_local.stderr
        assert list(root.iterdir()) == []
        result = stage(root, "--model", url, "--allow-http", "--skip-sha256")
    assert "THE MODEL ARCHIVE IS UNVERIFIED: --skip-sha256" in result.stderr
    assert sha256_of(model_archive) in result.stderr
    assert_model_installed(root)


def test_a_plain_http_url_is_refused_without_allow_http(tmp_path: Path, model_archive: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with serve_directory(model_archive.parent) as base_url:
        result = run_install(
            *("--root", str(root), "--no-venv", "--model", f"{base_url}/{model_archive.name}"),
            *("--sha256", sha256_of(model_archive)),
        )
    assert result.returncode != 0
    assert "plain http" in result.stderr
    assert list(root.iterdir()) == []


def test_an_https_download_is_verified_and_installed(staged: Path, model_archive: Path, tmp_path: Path) -> None:
    certificate = self_signed_certificate(tmp_path)
    with serve_directory(model_archive.parent, certificate=certificate) as base_url:
        assert base_url.startswith("https://")
        result = stage(
            staged,
            *("--model", f"{base_url}/{model_archive.name}", "--sha256", sha256_of(model_archive)),
            env={"CURL_CA_BUNDLE": str(certificate[0])},
        )
    assert "SHA-256 verified" in result.stdout
    assert_model_installed(staged)


def test_an_https_url_redirecting_to_http_is_not_followed(tmp_path: Path, model_archive: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    certificate = self_signed_certificate(tmp_path)
    with (
        serve_directory(model_archive.parent) as plain_url,
        serve_directory(model_archive.parent, certificate=certificate, redirect_to=plain_url) as base_url,
    ):
        result = run_install(
            *("--root", str(root), "--no-venv", "--model", f"{base_url}/{model_archive.name}"),
            *("--sha256", sha256_of(model_archive)),
            env={"CURL_CA_BUNDLE": str(certificate[0])},
        )
    assert result.returncode != 0
    assert "download failed" in result.stderr
    assert list(root.iterdir()) == []


def test_failed_download_installs_nothing(tmp_path: Path, model_archive: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with serve_directory(model_archive.parent) as base_url:
        result = run_install(
            "--root", str(root), "--no-venv", "--model", f"{base_url}/missing.zip", "--skip-sha256", "--allow-http"
        )
    assert result.returncode != 0
    assert "download failed" in result.stderr
    assert list(root.iterdir()) == []


def test_local_model_directory_is_copied(staged: Path, fake_model: Path) -> None:
    result = stage(staged, "--model", str(fake_model))
    assert "installed the Vosk model" in result.stdout
    assert_model_installed(staged)
    assert (fake_model / "am" / "final.mdl").is_file(), "the source directory stays where it was"


def test_local_tar_gz_archive_is_verified_and_unpacked(staged: Path, fake_model: Path, tmp_path: Path) -> None:
    archive = tar_model(fake_model, tmp_path / "model.tar.gz")
    result = stage(staged, "--model", str(archive), "--sha256", sha256_of(archive).upper())
    assert "SHA-256 verified" in result.stdout
    assert_model_installed(staged)


def test_installing_the_same_model_again_changes_nothing(staged: Path, model_archive: Path) -> None:
    checksum = sha256_of(model_archive)
    stage(staged, "--model", str(model_archive), "--sha256", checksum)
    before = tree_snapshot(staged)
    result = stage(staged, "--model", str(model_archive), "--sha256", checksum)
    assert "already this one" in result.stdout
    assert tree_snapshot(staged) == before


def test_new_model_replaces_the_old_one(staged: Path, fake_model: Path, tmp_path: Path) -> None:
    stage(staged, "--model", str(fake_model))
    (staged / MODEL_DIR / "leftover-from-old-model").write_text("old")
    other = make_fake_model(tmp_path / "other-model")
    (other / "am" / "final.mdl").write_bytes(b"newer acoustic model")
    stage(staged, "--model", str(other))
    assert (staged / MODEL_DIR / "am" / "final.mdl").read_bytes() == b"newer acoustic model"
    assert not (staged / MODEL_DIR / "leftover-from-old-model").exists()


def test_archive_without_a_model_layout_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    archive = tmp_path / "not-a-model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("something/readme.txt", "hello")
    result = run_install("--root", str(root), "--no-venv", "--model", str(archive), "--skip-sha256")
    assert result.returncode != 0
    assert "not a Vosk model" in result.stderr
    assert list(root.iterdir()) == []


def test_archive_with_path_traversal_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../../../escaped.txt", "outside")
        zf.writestr("model/am/final.mdl", "x")
    result = run_install("--root", str(root), "--no-venv", "--model", str(archive), "--skip-sha256")
    assert result.returncode != 0
    assert "unsafe path" in result.stderr
    assert list(root.iterdir()) == []
    assert not list(tmp_path.rglob("escaped.txt"))


def test_sha256_with_a_model_directory_is_an_error(tmp_path: Path, fake_model: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = run_install("--root", str(root), "--no-venv", "--model", str(fake_model), "--sha256", "0" * 64)
    assert result.returncode != 0
    assert "checks an archive" in result.stderr


def test_default_install_creates_the_virtualenv(tmp_path: Path) -> None:
    """The venv step for real, from a project copy whose requirements need no index (no network)."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "*_cache", "__pycache__"))
    (project / "requirements.txt").write_text("# nothing to download in this test\n")
    root = tmp_path / "root"
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}

    result = run_install("--root", str(root), script=project / "install.sh", env=offline)
    assert result.returncode == 0, result.stderr
    venv_python = root / INSTALL_DIR / ".venv" / "bin" / "python"
    check = subprocess.run(
        [str(venv_python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    )
    assert check.stdout.strip() == str(root / INSTALL_DIR / ".venv")
    assert (root / INSTALL_DIR / ".venv" / ".requirements.sha256").is_file()

    before = tree_snapshot(root / INSTALL_DIR / ".venv")
    again = run_install("--root", str(root), script=project / "install.sh", env=offline)
    assert again.returncode == 0, again.stderr
    assert "installing the pinned requirements" not in again.stdout
    assert tree_snapshot(root / INSTALL_DIR / ".venv") == before


def test_status_in_staging_mode_reports_the_installed_files(staged: Path) -> None:
    result = run_install("--root", str(staged), "--status")
    assert result.returncode == 0, result.stderr
    assert "/etc/ai-dialogue-backend/env" in result.stdout
    assert "mode 600" in result.stdout
    assert "/opt/ai-dialogue-backend/model/vosk-model" in result.stdout


def test_status_of_a_missing_installation_is_non_zero(tmp_path: Path) -> None:
    result = run_install("--root", str(tmp_path), "--status")
    assert result.returncode == 3
    assert "missing" in result.stdout


def test_logs_in_staging_mode_show_the_log_file(staged: Path) -> None:
    (staged / LOG_DIR / "server.log").write_text('{"msg": "server started"}\n')
    result = run_install("--root", str(staged), "--logs")
    assert result.returncode == 0, result.stderr
    assert "server started" in result.stdout


def test_help_lists_every_option() -> None:
    result = run_install("--help")
    assert result.returncode == 0
    for option in [
        "--user",
        "--dir",
        "--uninstall",
        "--purge",
        "--status",
        "--logs",
        "--model",
        "--sha256",
        "--skip-sha256",
        "--allow-http",
        "--no-start",
        "--no-venv",
        "--root",
    ]:
        assert option in result.stdout, option
    assert "vosk-model-cn-0.22.zip" in result.stdout
    assert "vosk-model-small-en-us-0.15.zip" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option"),
        (["--dir"], "needs a value"),
        (["--dir", "relative/path"], "absolute path"),
        (["--dir", "/usr"], "refusing"),
        (["--user", "Bad User"], "not a valid system user"),
        (["--model", "cn", "--sha256", "abc"], "64 hexadecimal"),
        (["--sha256", "0" * 64], "only makes sense with --model"),
        (["--purge"], "only makes sense with --uninstall"),
        (["--skip-sha256"], "only make sense with --model"),
        (["--model", "cn", "--sha256", "0" * 64, "--skip-sha256"], "contradict"),
        (["--model", "http://example.invalid/model.zip", "--sha256", "0" * 64], "plain http"),
        (["--model", "/no/such/model"], "no such file"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_install("--root", str(tmp_path), "--no-venv", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_install_sh_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(INSTALL_SH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
