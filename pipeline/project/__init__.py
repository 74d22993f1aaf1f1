"""Configuration, files, tracking and settings shared by every door."""

from pipeline.project.noise import quiet_known_noise

quiet_known_noise()  # before any door imports the libraries it quiets (noise.py)
