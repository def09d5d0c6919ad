"""What every stage's config is built from: one strict pydantic base, the location type (a local path or an
`s3://` URL) and the metrics endpoint settings every stage shares.

`StrictConfig` refuses unknown fields (a typo is an error naming the field, not a silently ignored setting) and
re-validates on assignment (`cfg.x = ...` obeys the same ranges as YAML). Stage configs subclass it; the CLI
builds them from YAML once (cluster/config_loading.py) and reports every problem with its field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from distill.core.storage import parse_location

PathOrURL = Annotated[Path | str, BeforeValidator(parse_location)]  # s3:// stays a URL string, the rest a Path


def absolute(location: Path | str | None) -> Path | str | None:
    """A local path made absolute against this process's working directory; URLs (s3://) and None unchanged.

    Stages call it on the driver before a config travels to Ray workers, whose working directory may differ (a
    user's own Ray started elsewhere): a relative path must mean what it meant where the user typed it."""
    return Path(location).absolute() if isinstance(location, Path) else location


class StrictConfig(BaseModel):
    """Base of every config model: unknown fields are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MetricsConfig(StrictConfig):
    """A stage's Prometheus endpoint (bound to loopback unless `host` says otherwise)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (logged)")
    pushgateway: str | None = Field(None, description="Pushgateway URL: `cache refresh` pushes its summary there, "
                             "`pipeline` its final metrics")
    targets_file: Path | None = Field(None, description="write this process's scrape target here (file_sd)")
