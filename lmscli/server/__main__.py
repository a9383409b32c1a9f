import sys

from lmscli.server.run import main

sys.exit(main())
