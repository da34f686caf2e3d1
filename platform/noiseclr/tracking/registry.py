"""Direction banks as MLflow registered models: versions, aliases, checksums.

A bank is logged as a pyfunc model whose artifacts are the bank folder (directions.safetensors,
bank.json); its `predict` returns direction vectors by index, token or label. One registered
model per (domain, base model), a version per registered run; aliases (`champion`, ...) and
tags, not stages. The sha256 of both files is recorded on the version at logging time and
checked on every download.

Everything that loads a bank takes `open_bank(ref)`: a folder, `models:/NAME@ALIAS` or
`models:/NAME/VERSION`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from noiseclr.discovery.bank import DIRECTIONS_FILE, META_FILE, DirectionBank
from noiseclr.errors import BankError

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


def log_bank(bank_dir: str | Path, registered_model: str | None = None, alias: str | None = None):
    """Log the bank in `bank_dir` as a pyfunc model of the active run and register a version.

    Returns the ModelVersion (None when `registered_model` is empty: logged, not registered)."""
    import mlflow
    from mlflow import MlflowClient

    from noiseclr.tracking.bank_model import BankModel

    bank = DirectionBank.load(bank_dir)
    name = registered_model if registered_model is not None else model_name(bank)
    sums = checksums(bank_dir)
    info = mlflow.pyfunc.log_model(
        name="bank",
        python_model=BankModel(),
        artifacts={"bank": str(bank_dir)},
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
    if bank.scores:  # the oracle-free measurement, readable without downloading the bank
        s = bank.scores
        client.set_model_version_tag(name, version.version, "score", f"{s['score']:.4f} {s['interval']}")
        client.set_model_version_tag(name, version.version, "live", f"{s['live']} of {len(bank)}")
        best = ", ".join(f"{i}:{s['directions'][i]['score']:.2f}" for i in s["order"][:8])
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
    """Download a registered bank into `dst` (default: a cache per name and version) and verify
    both files against the checksums recorded when it was logged. Returns the bank folder."""
    import mlflow

    version = resolve_version(ref)
    dst = Path(dst) if dst else CACHE / version.name / str(version.version)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{version.name}/{version.version}", dst_path=str(tmp)
            )
        )
    except Exception as err:  # the store is unreachable or the files are gone
        shutil.rmtree(tmp, ignore_errors=True)
        raise BankError(f"{ref}: could not download version {version.version} ({err})") from None
    # MLflow stores an artifact folder under its own name (not the artifacts key): find it.
    found = sorted((got / "artifacts").rglob(DIRECTIONS_FILE)) if (got / "artifacts").exists() else []
    folder = found[0].parent if found else got / "artifacts" / "bank"
    expected = {k: version.tags.get(CHECKSUM_TAG.format(k)) for k in (DIRECTIONS_FILE, META_FILE)}
    actual = checksums(folder) if (folder / DIRECTIONS_FILE).exists() else {}
    bad = [k for k, v in expected.items() if v is None or actual.get(k) != v]
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BankError(
            f"{ref} (version {version.version}): {', '.join(bad)} fails its checksum: the stored artifact "
            "was changed or damaged after it was logged"
        )
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(dst))
    shutil.rmtree(tmp, ignore_errors=True)
    return dst


def bank_folder(ref: str | Path) -> Path:
    """A folder as is; a models:/ reference downloaded and verified."""
    if str(ref).startswith("models:/"):
        return download_bank(str(ref))
    return Path(ref)


def open_bank(ref: str | Path, model=None) -> DirectionBank:
    """Load a bank from a folder or a models:/ reference (checked against `model` if given)."""
    return DirectionBank.load(bank_folder(ref), model)


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
