"""rollout_lab's Hydra launcher on Ray (`hydra/launcher=rollout_lab_ray`, the default in conf/config.yaml)."""
