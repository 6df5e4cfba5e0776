"""The FineTuneJob API types (stdlib + pydantic only)."""

from .v1alpha1 import *  # noqa: F401,F403
from .v1alpha1 import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus  # noqa: F401
