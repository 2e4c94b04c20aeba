import sys

from multitoken.cli.main import main

sys.exit(main())
