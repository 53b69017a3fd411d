"""`python -m finstream.cli`: how worker processes are started (WorkerProcess, `finstream run`)."""

from finstream.cli import main

main()
