"""Running analyses: the registry of declared analyses, the engine that runs any of them into a run directory,
the run store (manifest, shards, the one resume rule), the distributed session, progress and the front
(`runs.api`: run_lm, run_module, analyze, open_run)."""
