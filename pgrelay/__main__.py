"""`python -m pgrelay`: the same as the pgrelay command."""

from .cli import main

raise SystemExit(main())
