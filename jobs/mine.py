"""Mine grouping shards on a Ray cluster.

    ray job submit --working-dir . -- python jobs/mine.py --input URI --output URI

The same command as `distseg mine`; `ray job submit` sets RAY_ADDRESS, which the job joins.
"""

import sys

from distseg.cli import main

if __name__ == "__main__":
    main(["mine", *sys.argv[1:]])
