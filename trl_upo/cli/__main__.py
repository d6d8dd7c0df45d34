from trl_upo.cli import main

raise SystemExit(main())
