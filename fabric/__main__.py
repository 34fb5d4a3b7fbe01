import sys

from fabric.process import main

sys.exit(main())
