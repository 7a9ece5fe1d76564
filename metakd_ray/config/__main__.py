"""``python -m metakd_ray.config validate FILE [key=value ...]``: see ``metakd_ray.config.cli``."""

import sys

from metakd_ray.config.cli import main

sys.exit(main())
