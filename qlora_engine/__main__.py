import os
import sys

from qlora_engine.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # training.distributed.in_torchrun, without importing torch here
    # A rank of torchrun ends here, its files written and its process group torn down: exit without the
    # interpreter's teardown, where a thread of torch.distributed's left joinable now and then aborted the rank
    # ("terminate called without an active exception", SIGABRT) after a run that had finished or stopped well.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
sys.exit(code)
