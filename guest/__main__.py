import sys

from guest.process import main

sys.exit(main())
