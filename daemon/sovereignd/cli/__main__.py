"""Allow `python -m sovereignd.cli`, as `python -m sovereignd`."""

from sovereignd.cli import main

raise SystemExit(main())
