"""The edit API's request and response bodies (FastAPI builds the OpenAPI spec from these).

Field bounds here are the hard ones (finite numbers, names that are names); the configured
limits (serving.config.Limits) are checked against them per request by `check_limits`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from noiseclr.serving.config import BANK_NAME, Limits

# strict: a JSON type the API does not document is refused, not coerced ("5" or true as a seed).
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class EditItem(BaseModel):
    model_config = STRICT

    bank: str = Field(..., pattern=BANK_NAME, description="A bank name from GET /v1/banks.")
    direction: int | str = Field(..., description="Index, token (<name-3>) or label.")
    scale: float = Field(..., description="In the bank's measured units (1 = its clean edit).")
    t_high: int | None = Field(None, ge=0, le=1000, description="Default: the bank's window.")
    t_low: int | None = Field(None, ge=0, le=1000)


class EditRequest(BaseModel):
    """A seed (and optional prompt) to generate and edit, or an uploaded image to invert and edit."""

    model_config = STRICT

    seed: int = Field(0, ge=0, le=2**31 - 1)
    prompt: str | None = Field(
        None, description='For a seed. Default: the edited bank\'s gallery prompt; "" for none.'
    )
    image: str | None = Field(None, description="Base64 (or a data: URL) PNG/JPEG/WebP to edit instead.")
    edits: list[EditItem] = Field(default_factory=list)
    steps: int | None = Field(
        None, ge=2, description="Sampling steps (default: server's; uploads, DDIM: more)."
    )
    guidance: float | None = Field(None, ge=0, le=30, description="CFG scale for the prompt.")
    format: str = Field("png", pattern="^(png|json)$", description="png: the image; json: base64 + meta.")


class EditResponse(BaseModel):
    image: str  # base64 PNG
    meta: dict


class LabelRequest(BaseModel):
    model_config = STRICT
    label: str = Field(..., description="The human label; an empty string clears it.")


class Direction(BaseModel):
    index: int
    token: str
    label: str
    human_label: str | None
    auto_label: str | None
    window: list[int]  # [t_high, t_low]: where its edit acts (its measured window, else the bank's)
    # the oracle-free measurement (None where the bank was not measured)
    score: float | None = None
    interval: list[float] | None = None
    rank: int | None = None  # 1 = best
    dead: bool | None = None  # edits nothing measurable
    duplicate_of: int | None = None  # the index of the direction it repeats
    thumbnail: str  # URL of its PNG strip


class Bank(BaseModel):
    name: str
    source: str
    directions: int
    measured: bool
    window: list[int]
    base_model: str | None
    version: str | None  # the registered version a models:/ bank is at now
    score: float | None = None  # the oracle-free measurement's bank score
    live: int | None = None  # directions measured live
    hidden: int = 0  # dead directions this server leaves out (hide_dead)


def check_limits(req: EditRequest, limits: Limits) -> None:
    """ValueError naming the first limit the request passes."""
    if len(req.edits) > limits.max_edits:
        raise ValueError(f"{len(req.edits)} edits; at most {limits.max_edits} per request")
    if req.steps is not None and req.steps > limits.max_steps:
        raise ValueError(f"steps {req.steps}; at most {limits.max_steps}")
    for item in req.edits:
        if abs(item.scale) > limits.max_scale:
            raise ValueError(
                f"scale {item.scale} of {item.bank}:{item.direction}; |scale| at most {limits.max_scale}"
            )
        if item.t_high is not None and item.t_low is not None and item.t_low > item.t_high:
            raise ValueError(f"t_low {item.t_low} > t_high {item.t_high}")
    if req.prompt is not None and len(req.prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt of {len(req.prompt)} characters; at most {limits.max_prompt_chars}")
    if req.image is not None and req.prompt:
        raise ValueError("an uploaded image is edited without a prompt; give image or prompt, not both")
