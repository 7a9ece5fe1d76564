import sys

from metakd_ray.results.report import main

sys.exit(main())
