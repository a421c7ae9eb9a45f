import sys

from savegame.cli.main import main

sys.exit(main())
