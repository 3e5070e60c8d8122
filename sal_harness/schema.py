"""The base of every harness config model: unknown keys, wrong types and non-finite numbers are errors.

Strict mode: an int field takes no bool and no string, a float field takes no string and no NaN / inf
(``allow_inf_nan=False``); lists stay lists (OmegaConf hands them over as lists). Frozen: a validated
config is not changed afterwards (``model_copy(update=...)`` re-validates nothing, so the harness only
builds configs through ``model_validate``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
