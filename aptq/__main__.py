import sys

from aptq.cli import main

sys.exit(main())
