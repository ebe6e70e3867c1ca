"""`python -m minids_jax.config`: prints the field reference (docs/configuration.md)."""

import sys

from minids_jax.config import reference_markdown

sys.stdout.write(reference_markdown())
