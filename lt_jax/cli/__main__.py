import sys

from lt_jax.cli.main import main

sys.exit(main())
