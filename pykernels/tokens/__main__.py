"""`python -m pykernels.tokens`: the token report (same as `pykernels tokens`)."""

import sys

from .metering import main

sys.exit(main())
