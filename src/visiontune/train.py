"""`python -m visiontune.train`, the module torchrun runs (`torchrun -m visiontune.train ...`):
the same command as visiontune-train."""

from visiontune.cli import cli

if __name__ == "__main__":
    cli()
