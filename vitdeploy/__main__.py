import sys

from vitdeploy.cli import main

sys.exit(main())
