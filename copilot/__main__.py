from copilot.cli import main

raise SystemExit(main())
