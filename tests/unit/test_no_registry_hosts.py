"""No tracked file names a package registry's or mirror's host.

Where packages come from is the building machine's own configuration (pip's index-url and
find-links, npm's registry); the Dockerfile and deploy/compose-smoke.sh take it from there.
A host written into the repository would send every build to it, past that configuration.
The tracked files are read from git's index, in-process (no `git` process is started).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from cli.topology import REPO_ROOT

# Registries and mirrors by name: pip's, PyTorch's wheel index, npm's and yarn's, conda's,
# container registries, and distribution mirrors.
REGISTRY_HOSTS = re.compile(
    r"\b(?:pypi\.org|pypi\.python\.org|files\.pythonhosted\.org|download\.pytorch\.org"
    r"|registry\.npmjs\.org|registry\.yarnpkg\.com|conda\.anaconda\.org|repo\.anaconda\.com"
    r"|(?:registry-1\.)?docker\.io|ghcr\.io|quay\.io|gcr\.io|registry\.k8s\.io"
    r"|deb\.debian\.org|security\.debian\.org|archive\.ubuntu\.com|dl-cdn\.alpinelinux\.org)\b",
    re.IGNORECASE)
# Any other host given to an index option: `--index-url https://...`, `registry=https://...`.
INDEX_OPTION_WITH_HOST = re.compile(
    r"(?:index-url|extra-index-url|find-links|registry)[\"']?\s*[=: ]\s*[\"']?https?://", re.IGNORECASE)
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()


def tracked_files(repo: Path) -> list[str]:
    """The paths git's index holds (index versions 2 and 3, what git writes unless told otherwise)."""
    dot_git = repo / ".git"
    if not dot_git.exists():
        pytest.skip(f"{repo} is not a git checkout")
    git_dir = dot_git if dot_git.is_dir() else Path(dot_git.read_text().removeprefix("gitdir:").strip())
    data = (git_dir / "index").read_bytes()
    signature, version, count = struct.unpack(">4sII", data[:12])
    assert signature == b"DIRC" and version in (2, 3), f"git index version {version}: only 2 and 3 are read here"
    paths, offset = [], 12
    for _ in range(count):
        flags = struct.unpack(">H", data[offset + 60:offset + 62])[0]
        start = offset + 62 + (2 if version == 3 and flags & 0x4000 else 0)  # v3: extended flags
        end = data.index(b"\0", start)
        paths.append(data[start:end].decode())
        offset += (end - offset + 8) // 8 * 8  # each entry is NUL-padded to a multiple of 8 bytes
    return paths


def hosts_named(text: str) -> list[str]:
    return [m[0] for m in REGISTRY_HOSTS.finditer(text)] + [m[0] for m in INDEX_OPTION_WITH_HOST.finditer(text)]


def test_no_tracked_file_names_a_registry_or_mirror_host():
    found = {}
    for path in tracked_files(REPO_ROOT):
        file = REPO_ROOT / path
        if path == THIS_FILE or file.is_symlink() or not file.is_file():
            continue
        hits = hosts_named(file.read_bytes().decode("utf-8", errors="replace"))
        if hits:
            found[path] = sorted(set(hits))
    assert found == {}, "take these from the machine's pip/npm configuration instead"


def test_the_index_reader_finds_the_files_this_checkout_is_made_of():
    paths = set(tracked_files(REPO_ROOT))
    assert {"Dockerfile", "docker-compose.yml", THIS_FILE, "deploy/models.toml"} <= paths
    assert not any(p.startswith((".venv/", "gen/")) for p in paths)


@pytest.mark.parametrize("line", [
    "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
    "pip install --index-url https://mirror.example/simple torch",
    "registry=https://npm.example/",
    "FROM ghcr.io/org/image:1",
])
def test_the_check_catches_a_host(line):
    assert hosts_named(line)


@pytest.mark.parametrize("line", [
    'pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0',
    "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4317",
    "image: redis:7-alpine",
])
def test_the_check_lets_a_variable_or_a_mesh_address_through(line):
    assert hosts_named(line) == []
