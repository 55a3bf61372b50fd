import sys

from qlora_engine.cli import main

sys.exit(main())
