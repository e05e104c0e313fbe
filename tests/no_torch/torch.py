"""Stands in for torch on PYTHONPATH in tests that prove a command never imports it."""

raise ImportError("this command must not import torch")
