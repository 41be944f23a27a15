from mqttd.cli import main

raise SystemExit(main())
