"""
C{twistd fedserver} / C{twist fedserver}: options and service maker.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from fedserver.config import load_config
from fedserver.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Run a fedserver backend: the inward (federation) and outward (local "
        "components) listeners, as the TOML configuration FILE describes. "
        "`fedserver check-config FILE` runs the same validation without starting."
    )
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["loaded_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    Build the service; a configuration error exits with its message.
    C{[logging] format} chooses how the runner (C{twistd} or C{twist},
    whose options are C{options.parent}) writes the log.
    """
    from fedserver import logs
    from fedserver.service import build_service

    config = options["loaded_config"]
    try:
        service = build_service(config)
    except ConfigError as e:
        raise SystemExit(f"fedserver: {e}") from None
    return logs.install(service, config.log_format, getattr(options, "parent", None))


__all__ = ["Options", "makeService"]
