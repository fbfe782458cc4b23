from aurora.cli import main

raise SystemExit(main())
