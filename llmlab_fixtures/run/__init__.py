"""Running a benchmark: options and presets, the worker session, the controller's merge, xdist scheduling,
workers and cores, checkpoints, the network guard and progress."""
