"""The base of every configuration section: a frozen pydantic model that rejects unknown keys
and non-finite numbers (`lr = inf` would train a round into NaN).

Each layer defines the settings it consumes as a section (e.g. `fedse.evolve.sft.TrainSection`
is the TOML `[train]` table), with its defaults there and nowhere else; the run configuration
(`fedse.experiments.config.RunConfig`) only composes them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
