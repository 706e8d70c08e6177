from expertflow.cli import main

raise SystemExit(main())
