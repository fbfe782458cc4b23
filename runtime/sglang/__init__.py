"""SGLang integration: launch SGLang with EAGLE-3, capture traces with a plugin,
hot-swap the draft, and export revisions in SGLang's EAGLE-3 layout.

Everything here is written against one pinned SGLang release (``SGLANG_VERSION``);
tests parse that release's source (see ``source.py``) so a change in SGLang that
breaks a hook, a flag or a weight name fails a test rather than a production server.
"""

from __future__ import annotations

# The newest 0.5.x release that has the `sglang.srt.plugins` entry-point group (0.5.11+)
# AND still decides acceptance in `EagleVerifyInput.verify` with both the V1
# (eagle_worker.py) and V2 (eagle_worker_v2.py) workers: 0.5.13 removed the V1 worker,
# 0.5.14 removed `EagleVerifyInput.verify` (acceptance moved to `run_eagle_verify`).
SGLANG_VERSION = "0.5.12"
