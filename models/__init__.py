"""PyTorch side of stn: localisation nets, transform families, the sampler op, training.

Importing this package does not import torch: ``models.frames`` is numpy-only and is
shared with the service (which runs without torch). Import the submodules you need.
"""
