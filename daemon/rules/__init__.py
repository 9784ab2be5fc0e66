"""The rules engine: YAML rules (spec), rolling baselines, evaluation, fixtures and hot reload."""
