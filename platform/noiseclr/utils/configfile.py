"""Reading config files, for every config of the platform (discovery, sweep, serve, submit):
YAML with one-line errors that name the file, credentials only as "${VAR}", and pydantic's
validation errors as one line that names the key."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from noiseclr.errors import ConfigError


def read_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file of keys -> values; one-line ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


# Option names that hold credentials (s3fs key/secret/token, gcsfs token, adlfs account_key,
# sas_token, client_secret, passwords...). Their values must be "${VAR}": the job file, bank.json,
# MLflow params and checkpoints then hold the variable's name, never the secret.
CREDENTIAL = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?|sas|signature)($|_)", re.I)
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:]*:[^/@]+@", re.I)


def check_no_secrets(options: object, where: str) -> None:
    """ValueError when a credential-named option holds a literal instead of "${VAR}"."""
    if isinstance(options, dict):
        for key, value in options.items():
            here = f"{where}.{key}"
            literal = value is not None and not isinstance(value, dict | list | bool)
            if CREDENTIAL.search(str(key)) and literal and not ENV_REF.match(str(value)):
                raise ValueError(
                    f"{here} looks like a credential: a job file's options are written into "
                    f'bank.json, MLflow params and checkpoints; write "${{VAR}}" and set VAR in '
                    "the environment (or use the provider's own, e.g. AWS_SECRET_ACCESS_KEY)"
                )
            check_no_secrets(value, here)
    elif isinstance(options, list):
        for n, value in enumerate(options):
            check_no_secrets(value, f"{where}[{n}]")


def resolve_env(options: object) -> object:
    """A copy with every "${VAR}" value replaced by the environment's VAR (where it is used, in
    the process that opens the files; never written back). ConfigError when VAR is unset."""
    if isinstance(options, dict):
        return {k: resolve_env(v) for k, v in options.items()}
    if isinstance(options, list):
        return [resolve_env(v) for v in options]
    if isinstance(options, str) and (m := ENV_REF.match(options)):
        if m.group(1) not in os.environ:
            raise ConfigError(
                f"storage option {options}: ${m.group(1)} is not set in this process's environment"
            )
        return os.environ[m.group(1)]
    return options


def validation_message(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's errors as one line: the key and what is wrong with it (no help URLs); an
    unknown key of `model` (or of one of its nested sections) names the closest known one."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(unknown_key(key, str(e["loc"][-1]), _fields_at(model, e["loc"][:-1])))
        elif key and e["type"] == "value_error":  # a section's own check: its message says it all
            parts.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        elif key:
            parts.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        else:
            parts.append(e["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def unknown_key(key: str, name: str, known: list[str]) -> str:
    """ "unknown key KEY", naming the known key closest to its last part `name` if one is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys a config section accepts, following nested sections along `loc`."""
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        sub = field.annotation if field else None
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return list(model.model_fields) if model else []
