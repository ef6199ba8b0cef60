from nanodb.interfaces.cli import main

raise SystemExit(main())
