"""Run per-rank folders: model forward, collectives, launcher."""
