import sys

from qcow2engine.cli.main import main

sys.exit(main())
