"""`python -m benchmarks.peers`: see benchmarks/peers/driver.py."""

from benchmarks.peers.driver import main

raise SystemExit(main())
