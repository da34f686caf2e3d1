"""Direction banks as MLflow registered models: versions, aliases, checksums.

A bank is logged as a pyfunc model whose artifacts are the bank folder (directions.safetensors,
bank.json, and its card README.md with the gallery image the card shows); its `predict` returns
direction vectors by index, token or label. One registered model per (domain, base model), a
version per registered run; aliases (`champion`, ...) and tags, not stages. The sha256 of the
two bank files is recorded on the version at logging time and checked on every download.

Everything that loads a bank takes `open_bank(ref)`: a folder, `models:/NAME@ALIAS` or
`models:/NAME/VERSION`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from noiseclr.bank import DIRECTIONS_FILE, META_FILE, DirectionBank
from noiseclr.errors import BankError, StorageError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
CHECKSUM_TAG = "sha256.{}"  # version tag per bank file
CACHE = Path(os.environ.get("NOISECLR_CACHE", Path.home() / ".cache" / "noiseclr")) / "models"


def checksums(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in (DIRECTIONS_FILE, META_FILE)
    }


def model_name(bank: DirectionBank) -> str:
    """One registered model per (domain, base model): the bank's name and the model's fingerprint."""
    return f"noiseclr-{bank.name}-{str(bank.base_model.get('fingerprint', 'unknown'))[:8]}"


def stage_bank(bank_dir: str | Path, bank: DirectionBank, staged: Path) -> Path:
    """The folder a registered version stores: the bank's two files as they are (their checksums
    are the version's), its card README.md, and the gallery image beside the bank, copied in as
    gallery.png so the card shows it wherever the version is downloaded."""
    from noiseclr.card import GALLERY_FILE, write_card

    staged.mkdir(parents=True)
    for name in (DIRECTIONS_FILE, META_FILE):
        shutil.copyfile(Path(bank_dir) / name, staged / name)
    gallery = Path(bank_dir).parent / "gallery" / GALLERY_FILE
    if gallery.is_file():
        shutil.copyfile(gallery, staged / GALLERY_FILE)
    write_card(staged, bank, gallery=staged / GALLERY_FILE, find_gallery=False)
    return staged


def log_bank(bank_dir: str | Path, registered_model: str | None = None, alias: str | None = None):
    """Log the bank in `bank_dir` as a pyfunc model of the active run and register a version.

    Returns the ModelVersion (None when `registered_model` is empty: logged, not registered)."""
    import mlflow
    from mlflow import MlflowClient

    bank = DirectionBank.load(bank_dir)
    name = registered_model if registered_model is not None else model_name(bank)
    sums = checksums(bank_dir)
    with tempfile.TemporaryDirectory(prefix="noiseclr-log-") as tmp:
        staged = stage_bank(bank_dir, bank, Path(tmp) / "bank")
        info = mlflow.pyfunc.log_model(  # models from code: the model is this file, nothing pickled
            name="bank",
            python_model=str(Path(__file__).with_name("bank_model_code.py")),
            artifacts={"bank": str(staged)},
            pip_requirements=["noiseclr", "mlflow"],
        )
    mlflow.set_tags({f"bank.{CHECKSUM_TAG.format(k)}": v for k, v in sums.items()})
    if not name:
        return None
    version = mlflow.register_model(
        info.model_uri, name, tags={CHECKSUM_TAG.format(k): v for k, v in sums.items()}
    )
    client = MlflowClient()
    client.set_model_version_tag(name, version.version, "bank", bank.name)
    client.set_model_version_tag(
        name, version.version, "fingerprint", str(bank.base_model.get("fingerprint"))
    )
    if bank.scores is not None:  # the oracle-free measurement, readable without downloading the bank
        s = bank.scores
        client.set_model_version_tag(name, version.version, "score", f"{s.score:.4f} {list(s.interval)}")
        client.set_model_version_tag(name, version.version, "live", f"{s.live} of {len(bank)}")
        best = ", ".join(f"{i}:{s.directions[i].score:.2f}" for i in s.order[:8])
        client.set_model_version_tag(name, version.version, "ranked", best)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def resolve_version(ref: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the ModelVersion; one-line BankError if absent."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.match(ref)
    if not m:
        raise BankError(
            f"{ref!r} is not a bank reference: use a folder, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    client = MlflowClient()
    try:
        client.get_registered_model(m["name"])
    except MlflowException:
        raise BankError(f"{ref}: no registered model {m['name']!r} on {_uri()}") from None
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException:
        what = f"alias {m['alias']!r}" if m["alias"] else f"version {m['version']}"
        raise BankError(f"{ref}: model {m['name']!r} has no {what}") from None


def download_bank(ref: str, dst: str | Path | None = None) -> Path:
    """Download a registered bank and verify both files against the checksums recorded when it
    was logged. Returns the bank folder.

    Without `dst`: a cache folder per name and version, shared by the replicas of a node: under a
    file lock, reused as it is when its files still match, so one process never replaces files
    another is reading. With `dst` (a user's folder): refused when it holds anything but a bank;
    the bank's files are written into it and nothing else there is touched or deleted."""
    version = resolve_version(ref)
    expected = {k: version.tags.get(CHECKSUM_TAG.format(k)) for k in (DIRECTIONS_FILE, META_FILE)}
    if dst is None:
        dst = CACHE / version.name / str(version.version)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst.parent / f".{dst.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _matches(dst, expected):
                return dst
            with _fetched(ref, version, dst.parent, expected) as folder:
                if dst.exists():  # a damaged cache entry (ours): set aside, then removed
                    aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
                    os.replace(dst, aside / "bank")
                    shutil.rmtree(aside, ignore_errors=True)
                os.replace(folder, dst)
        return dst
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise BankError(f"{dst} is a file; give a folder for the bank")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / META_FILE).exists():
        raise BankError(
            f"{dst} is not empty and holds no bank: nothing there is overwritten or deleted; "
            "give an empty or new folder"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _fetched(ref, version, dst.parent, expected) as folder:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            target = dst / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)  # each file whole: the old one or the new one, never half
    return dst


def _matches(folder: Path, expected: dict[str, str | None]) -> bool:
    try:
        return all(expected.values()) and checksums(folder) == expected
    except OSError:
        return False


@contextmanager
def _fetched(ref: str, version, beside: Path, expected: dict[str, str | None]):
    """The version's bank folder, downloaded into a private temporary folder in `beside` (same
    file system, so it can be renamed into place) and verified; the temporary folder is removed."""
    import mlflow

    tmp = Path(tempfile.mkdtemp(dir=beside, prefix=".noiseclr-download-"))
    try:
        try:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    f"models:/{version.name}/{version.version}", dst_path=str(tmp)
                )
            )
        except Exception as err:  # the store is unreachable or the files are gone
            raise BankError(f"{ref}: could not download version {version.version} ({err})") from None
        # MLflow stores an artifact folder under its own name (not the artifacts key): find it.
        found = sorted((got / "artifacts").rglob(DIRECTIONS_FILE)) if (got / "artifacts").exists() else []
        folder = found[0].parent if found else got / "artifacts" / "bank"
        actual = checksums(folder) if (folder / DIRECTIONS_FILE).exists() else {}
        bad = [k for k, v in expected.items() if v is None or actual.get(k) != v]
        if bad:
            raise BankError(
                f"{ref} (version {version.version}): {', '.join(bad)} fails its checksum: the stored "
                "artifact was changed or damaged after it was logged"
            )
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_registered(ref: str | Path) -> bool:
    """A models:/ reference: a registered version, read-only (a command never rewrites its
    download; its results go to a new version)."""
    return str(ref).startswith("models:/")


def bank_folder(ref: str | Path) -> Path:
    """A folder as is; a models:/ reference downloaded and verified."""
    if is_registered(ref):
        return download_bank(str(ref))
    return Path(ref)


def output_beside(ref: str | Path, folder: Path, what: str) -> Path:
    """Where a command writes `what` (gallery, evaluation) for a bank by default: beside its
    folder; for a registered bank, out/<name>-<alias|version>/ (the download is not a home)."""
    if is_registered(ref):
        return Path("out") / str(ref).removeprefix("models:/").replace("/", "-").replace("@", "-") / what
    return folder.parent / what


def open_bank(ref: str | Path, model=None) -> DirectionBank:
    """Load a bank from a folder or a models:/ reference (checked against `model` if given)."""
    return DirectionBank.load(bank_folder(ref), model)


def require_tracking_uri():
    """An MlflowClient for the server in MLFLOW_TRACKING_URI (StorageError when it is unset: the
    registry is a server's, never a folder made wherever the command ran)."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StorageError("set MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000 from `noiseclr mlflow up`)")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise StorageError("the model registry needs mlflow: pip install 'noiseclr[track]'") from None
    return MlflowClient()


def registered_banks() -> list[tuple[str, int, dict[str, str]]]:
    """Every registered bank: (name, number of versions, alias -> version)."""
    client = require_tracking_uri()
    return [
        (rm.name, len(client.search_model_versions(f"name='{rm.name}'")), dict(rm.aliases or {}))
        for rm in client.search_registered_models()
    ]


def promote(ref: str, alias: str = "champion"):
    """Point `alias` at the version `ref` names; returns that version."""
    client = require_tracking_uri()
    version = resolve_version(ref)
    client.set_registered_model_alias(version.name, alias, version.version)
    return version


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
