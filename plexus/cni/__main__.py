import sys

from plexus.cni.plugin import main

sys.exit(main())
