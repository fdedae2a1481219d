"""`python -m deepseek_vl_jax ...` = the `deepseek-vl-jax` command."""

import sys

from deepseek_vl_jax.cli import main

sys.exit(main())
