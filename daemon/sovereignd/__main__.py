"""Allow `python -m sovereignd`."""

from sovereignd.cli import main

raise SystemExit(main())
