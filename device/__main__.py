import sys

from device.process import main

sys.exit(main())
