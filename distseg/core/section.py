"""The base of every config section: unknown keys are refused, assignments are validated.

A leaf module, so components (methods, priors, models) can define their own config sections without
importing `distseg.config`, which assembles them.
"""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
