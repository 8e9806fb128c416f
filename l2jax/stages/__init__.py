"""Stages: each module has `run(cfg, run_dir, **flags)`; the launcher dispatches on `cfg.stage`."""
