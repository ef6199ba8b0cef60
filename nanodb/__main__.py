from nanodb.cli import main

raise SystemExit(main())
