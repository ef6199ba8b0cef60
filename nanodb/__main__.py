"""`python -m nanodb`: the command line. A Ctrl-C while it still imports ends it quietly (status 130)."""

try:
    from nanodb.interfaces.cli import main
except KeyboardInterrupt:
    raise SystemExit(130) from None

raise SystemExit(main())
