"""Run a script as a process that starts its work late: `python tests/late_start.py SECONDS
scripts/train.py ARGS...` sleeps SECONDS right after joining the multi-process run (after
`moejax.training.distributed.initialize` returns), as a host with a cold compilation cache or a
busy filesystem would. Used by tests/test_multiprocess.py and by hand for longer delays."""

import runpy
import sys
import time

from moejax.training import distributed


def main() -> None:
    delay_s, script, *args = sys.argv[1:]
    join = distributed.initialize

    def join_then_wait(*join_args, **join_kwargs):
        joined = join(*join_args, **join_kwargs)
        print(f"late_start: joined; waiting {delay_s} s before starting work", flush=True)
        time.sleep(float(delay_s))
        return joined

    distributed.initialize = join_then_wait
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
