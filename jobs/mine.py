"""Mine grouping shards on a Ray cluster.

    ray job submit --working-dir . -- python jobs/mine.py --input URI --output URI

The same command as `distseg mine`; `ray job submit` sets RAY_ADDRESS, which the job joins.
"""

from distseg.cli import app

if __name__ == "__main__":
    app(["mine", *__import__("sys").argv[1:]])
