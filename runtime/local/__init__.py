"""`aurora local`: the whole loop on one machine.

- `config`: LocalConfig, the run's knobs;
- `run`: LocalMode, the run itself (Redis, traffic, the rollout rounds, swap timing);
- `processes`: the `aurora serve` and `aurora train` processes it spawns;
- `live`: the live terminal view;
- `report`: what a run records and the report folder (JSON, Markdown, plot).
"""

from aurora.runtime.local.config import LOCAL_ROLLOUT, LocalConfig
from aurora.runtime.local.report import LocalRun, Sample, write_report
from aurora.runtime.local.run import LocalMode

__all__ = ["LOCAL_ROLLOUT", "LocalConfig", "LocalMode", "LocalRun", "Sample", "write_report"]
