"""`python -m gateway.cli`: the same as the `cosmos-gateway` console script."""

import sys

from gateway.cli.main import main

sys.exit(main())
