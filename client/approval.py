"""Which code this hospital runs: the digest of a Flower app bundle (FAB), and the digests it approved.

A study's ClientApp arrives from the coordinator as a FAB. The hospital reviewed and installed a fedrad
release; client/runtime.py runs a study's app only if the app's **code digest** is one this hospital
approved, and checks it before any file of the bundle is installed or imported.

The code digest is SHA-256 over every file in the bundle (its path and the SHA-256 of its bytes, in path
order), except the bundle's own manifest (``.info/CONTENT``, derived from the files) and prose and data
that no Python import can load and fedrad's code never reads: ``*.md``, ``*.json``, ``*.jsonl``,
``*.yaml``, ``*.yml`` and ``LICENSE``. So every ``.py`` file and ``pyproject.toml`` (which names the
ClientApp to load) counts, and so does any file a legitimate ``flwr build`` never packs (a compiled
module, a ``.pyc``, a second entry with the same name): each changes the digest. Documentation and
benchmark results do not, so a release's digest stays the same when only those differ.

A checkout's digest is computed from the bundle that ``flwr build`` (and so ``fedrad server run``)
makes of it: the same file selection (.gitignore, Flower's include and exclude patterns), the same
bytes. The approved digests are the installed fedrad's (the checkout this code was imported from), and
any the hospital's policy lists (``[code] approved``, client/policy.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

from common.errors import FedradError

MANIFEST = ".info/CONTENT"
INERT_SUFFIXES = (".md", ".json", ".jsonl", ".yaml", ".yml")
_CHUNK = 1 << 20


def counts(name: str) -> bool:
    """Whether the bundle file ``name`` is part of the code digest (module docstring)."""
    return name != MANIFEST and name != "LICENSE" and not name.lower().endswith(INERT_SUFFIXES)


def fab_digest(fab: bytes) -> str:
    """The code digest of a FAB's bytes. Entries are hashed as streams, so a crafted bundle that
    inflates to gigabytes costs time, never memory. Raises FedradError for bytes that are no zip."""
    digest = hashlib.sha256(b"fedrad code digest v1\n")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            for info in sorted(bundle.infolist(), key=lambda entry: entry.filename):
                if not counts(info.filename):
                    continue
                content = hashlib.sha256()
                with bundle.open(info) as stream:
                    while chunk := stream.read(_CHUNK):
                        content.update(chunk)
                digest.update(f"{info.filename}\0{content.hexdigest()}\n".encode())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise FedradError(f"not a readable app bundle ({exc})") from None
    return digest.hexdigest()


def checkout_digest(root: Path) -> str:
    """The code digest of the bundle ``flwr build`` makes of the checkout ``root``."""
    from flwr.cli.build import build_fab_from_files

    if not (root / "pyproject.toml").is_file():
        raise FedradError(f"{root}: not a fedrad checkout (no pyproject.toml)")
    try:
        return fab_digest(build_fab_from_files(checkout_files(root.resolve()))[0])
    except (ValueError, OSError) as exc:  # Flower's build errors (bad pyproject, too large) are ValueErrors
        raise FedradError(f"{root}: cannot bundle it as Flower does ({exc})") from None


# Folders Flower's build always leaves out (flwr.common.constant.FAB_EXCLUDE_PATTERNS: "**/__pycache__/**",
# and ".venv/**" and the like at the top); not walked, so the digest takes a second, not a walk of the venv.
_NEVER_PACKED_TOP = {".flwr", "build", "eggs", ".eggs", "lib", "lib64", "parts", ".venv", "env", "venv", "ENV",
                     "env.bak", "venv.bak"}


def checkout_files(root: Path) -> dict[str, Path]:
    """The files Flower's ``collect_files`` hands its build, less those in folders the build always leaves
    out (the same bundle comes of it: tests/test_approved_code.py compares): symlinks and paths that leave
    ``root`` skipped, POSIX paths relative to ``root``."""
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, followlinks=False):
        top = Path(folder) == root
        subfolders[:] = [name for name in subfolders
                         if name != "__pycache__" and not (top and name in _NEVER_PACKED_TOP)]
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


def digest_of(path: Path) -> str:
    """The code digest of a checkout folder or of a ``.fab`` file."""
    if path.is_dir():
        return checkout_digest(path)
    if path.is_file():
        return fab_digest(path.read_bytes())
    raise FedradError(f"not found: {path}")


def installed_checkout() -> Path | None:
    """The checkout this fedrad is imported from (an editable install or a source tree on the path), or
    None where fedrad was installed without its pyproject.toml (a wheel)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def approved_code(listed: tuple[str, ...], policy_source: str) -> dict[str, str]:
    """Digest -> where its approval comes from: the installed fedrad's, then those the policy lists.
    Raises FedradError where there is none (the node would refuse every study)."""
    approved: dict[str, str] = {}
    root = installed_checkout()
    if root is not None:
        approved[checkout_digest(root)] = f"the installed fedrad ({root})"
    for digest in listed:
        approved.setdefault(digest, f"listed in policy {policy_source}")
    if not approved:
        raise FedradError("no approved code: this fedrad is not installed from a checkout, so list the digests "
                          "of the releases this hospital approved in the policy's [code] approved "
                          "('fedrad client digest CHECKOUT' prints one)")
    return approved


def describe(approved: dict[str, str]) -> list[str]:
    """The approved digests, one line each, for the node's start-up print and ``fedrad policy show``."""
    return ["approved code (a study's app runs here only with one of these digests):",
            *(f"  {digest}  {origin}" for digest, origin in approved.items())]
