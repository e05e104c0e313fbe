"""visiontune's Hydra configs; shipped in the package as visiontune.conf."""
