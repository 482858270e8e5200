"""Helpers shared by the scripts and the library: user errors, image files, rendering, CLI flags."""
