"""`python -m aptq …`; Ctrl-C at any moment, even while the modules are still importing, ends with one line and 130."""

import sys

try:
    from aptq.cli import main

    status = main()
except KeyboardInterrupt:  # during the imports: main() answers for itself once it runs
    print("interrupted before any work started", file=sys.stderr)
    status = 130
sys.exit(status)
