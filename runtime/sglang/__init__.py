"""SGLang integration: launch SGLang with or without a draft, capture traces with a
plugin, hot-swap the draft (or restart into one), and export revisions in SGLang's
EAGLE-3 layout.

Written against the SGLang releases in ``SUPPORTED_VERSIONS``: tests parse each one's
wheel (see ``source.py``), so a change in SGLang that breaks a hook, a flag or a weight
name fails a test rather than a production server. The launcher and the plugin refuse
any other release at start-up (``require_supported``).
"""

from __future__ import annotations

import importlib.metadata

# 0.5.23: the newest release (torch 2.14.1), the primary target: acceptance in
# speculative/eagle_utils.eagle_sample, draft weight updates with selector="draft"
# inside /begin_weight_update ... /end_weight_update.
# 0.5.12: the last release on torch 2.11 (what current GPU images carry), the newest
# with the plugin entry-point group and EagleVerifyInput.verify (V1) beside the V2 path.
PRIMARY_VERSION = "0.5.23"
SUPPORTED_VERSIONS = ("0.5.12", "0.5.23")


class UnsupportedVersion(RuntimeError):
    """The installed SGLang is not a release Aurora's hooks were checked against."""


def installed_version() -> str | None:
    """The installed SGLang release, or None when SGLang is not installed."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_supported(version: str | None) -> str:
    """``version`` when Aurora supports it; UnsupportedVersion naming the supported
    releases otherwise (also for no SGLang at all)."""
    if version in SUPPORTED_VERSIONS:
        return version
    found = f"SGLang {version}" if version else "no SGLang"
    raise UnsupportedVersion(
        f"{found} installed; Aurora's SGLang plugin is tested against "
        f"{', '.join(SUPPORTED_VERSIONS)} only (its contract tests parse those releases): "
        f"install one of them, e.g. pip install 'sglang=={PRIMARY_VERSION}', or use the "
        f"lmsysorg/sglang:v{PRIMARY_VERSION} image"
    )
