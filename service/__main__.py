"""``python -m service <command>``: see ``service.cli``."""

from service.cli import main

raise SystemExit(main())
