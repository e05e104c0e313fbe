"""visiontune-search: an Optuna study over visiontune-train's config (command.py), trained by workers."""
