"""One module per claim of the paper: what its notebook runs, plots and records. The notebooks
hold the narrative and the parameters; the logic lives here so it is tested and reused."""
