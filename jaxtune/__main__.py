import sys

from jaxtune.launch import quiet_ctrl_c

with quiet_ctrl_c():  # the rest of the command line's imports
    from jaxtune.cli import main

sys.exit(main())
