"""`aurora local`: the whole loop on one machine.

- `config`: LocalConfig, the run's knobs;
- `run`: LocalMode, the run itself (Redis, traffic, the rollout rounds, swap timing);
- `processes`: the `aurora serve` and `aurora train` processes it spawns;
- `live`: the live terminal view;
- `report`: what a run records and the report folder (JSON, Markdown, plot).
"""
