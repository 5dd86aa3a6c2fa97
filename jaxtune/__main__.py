import sys

from jaxtune.cli import main

sys.exit(main())
