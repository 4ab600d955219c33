"""Reports: comparison tables, paired agreement, cost and energy, speed figures, plots, HTML and the results
directory."""
