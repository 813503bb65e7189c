"""torchrun entry for the distributed tests: `python -m sf_core ...` with a planted failure on one rank.

SF_TEST_FAIL="<rank>:<iteration>:<kill|hang|sigint>" makes that rank, when it is about to run that iteration,
kill itself with SIGKILL (a crash with no cleanup), stop answering (sleep), or send itself SIGINT (a Ctrl-C
that reaches this rank only; the others must stop with it).
"""

import os
import signal
import sys
import time

from sf_core.train.trainer import Trainer

spec = os.environ.get("SF_TEST_FAIL")
if spec:
    rank, iteration, how = spec.split(":")
    if int(os.environ.get("RANK", "0")) == int(rank):
        step = Trainer.train_step

        def failing_step(self):
            if self.iteration == int(iteration):
                if how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                    return step(self)  # the signal is deferred: this iteration completes
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return step(self)

        Trainer.train_step = failing_step

from sf_core.cli import main  # noqa: E402

sys.exit(main())
