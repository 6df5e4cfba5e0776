import sys

from kubesloth.trainer.main import main

sys.exit(main())
