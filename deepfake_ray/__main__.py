"""`python -m deepfake_ray`: as `python -m deepfake_ray.cli` (where the console script is
not on PATH; in IPython, `%run -m deepfake_ray` ends the command, not the kernel)."""
from deepfake_ray.cli import console_main

console_main(exits=None)
