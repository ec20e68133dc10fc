"""`python -m kolm_ray.demo.demo` (`make demo`)."""

import sys

from kolm_ray.demo.demo import main

sys.exit(main())
