"""Mining on a real local Ray cluster: bad inputs, exactly-once resume after SIGKILL, the manifest,
bounded restarts of workers that crash in native code."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from distseg.config import load_config
from distseg.data.synthetic import make_scene
from distseg.mining import MiningError, mine
from distseg.shards import decode_record

PRIORS = "mine.priors=[ucm,felzenszwalb,slic,saliency]"
CRASH_SHAPE = (23, 17)  # the test-only `crash_test` prior segfaults its process on an image of this size


def crash_prior_hook():
    """A setup hook registering the test-only `crash_test` prior (a nested function, so Ray pickles it by
    value and every worker process can run it, although the tests folder is not importable there)."""

    def register():
        import ctypes

        import numpy as np

        from distseg.grouping.priors import PRIORS, PriorOutput

        def crash_test(cfg):
            def prior(image):
                if image.shape[:2] == (23, 17):  # CRASH_SHAPE
                    ctypes.string_at(0)  # reads address 0: a real segfault, as in a crash in OpenCV or higra
                return PriorOutput(regions=np.zeros(image.shape[:2], np.uint8))

            return prior

        if "crash_test" not in PRIORS:
            PRIORS.register("crash_test", crash_test)

    return register


@pytest.fixture(scope="module")
def local_ray():
    hook = crash_prior_hook()
    hook()  # the driver validates prior names too
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"worker_process_setup_hook": hook}
    )
    yield
    ray.shutdown()


def scene(i, size=64):
    return make_scene(i, size, 0, "train").image


def make_corpus(folder):
    """Each kind of input the issue lists, with the outcome mining must give it."""
    folder.mkdir()
    ok, bad = {}, {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)

    save("rgb.png", Image.fromarray(scene(0)))
    ok["rgb"] = (64, 64)
    save("grey.png", Image.fromarray(scene(1)[:, :, 0]))
    ok["grey"] = (64, 64)
    save("rgba.png", Image.fromarray(np.dstack([scene(2), np.full((64, 64), 128, np.uint8)])))
    ok["rgba"] = (64, 64)
    save("palette.png", Image.fromarray(scene(3)).convert("P"))
    ok["palette"] = (64, 64)
    save("deep16.png", Image.fromarray(scene(4)[:, :, 0].astype(np.uint16) * 257))
    ok["deep16"] = (64, 64)
    save("one.png", Image.fromarray(np.zeros((1, 1, 3), np.uint8)))
    ok["one"] = (1, 1)
    save("two.png", Image.fromarray(np.full((2, 2, 3), 200, np.uint8)))
    ok["two"] = (2, 2)
    big = np.kron(scene(5, 64), np.ones((40, 60, 1), np.uint8))  # 2560 x 3840
    save("large.jpg", Image.fromarray(big), quality=80)
    ok["large"] = (64, 96)  # resized to max_side=96
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    save("sub/exif.jpg", Image.fromarray(scene(6)[:40, :]), exif=exif) if (folder / "sub").mkdir() is None else None
    ok["sub/exif"] = (64, 40)  # stored 40 x 64, shown upright as 64 x 40
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    bad["corrupt"] = "decode"
    data = (folder / "rgb.png").read_bytes()
    Image.fromarray(scene(7)).save(folder / "full.jpg", quality=90)
    (folder / "truncated.jpg").write_bytes((folder / "full.jpg").read_bytes()[:300])
    (folder / "full.jpg").unlink()
    bad["truncated"] = "decode"
    (folder / "text.jpg").write_text("this is not an image")
    bad["text"] = "decode"
    (folder / "empty.png").write_bytes(b"")
    bad["empty"] = "decode"
    (folder / "notes.txt").write_text("ignored: not an image extension")
    assert data
    return ok, bad


def read_rows(out):
    return pq.read_table(out / "shards").to_pylist()


def read_errors(out):
    return {r["image_id"]: r for r in pq.read_table(out / "errors").to_pylist()}


def test_bad_inputs_are_processed_or_recorded(tmp_path, local_ray):
    ok, bad = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    cfg = load_config(
        "demo",
        [
            PRIORS,
            "edges.detector=gradient",
            "mine.max_side=96",
            "mine.rows_per_shard=4",
            f"workdir={tmp_path / 'work'}",
        ],
    )
    summary = mine(cfg, str(tmp_path / "in"), str(out), progress=False)
    assert (summary.mined, summary.errors, summary.new) == (len(ok), len(bad), len(ok) + len(bad))
    assert summary.crashed == 0 and summary.processing_seconds > 0
    assert sum(w["images"] for w in summary.workers) == len(ok) + len(bad)
    assert all(w["peak_rss_bytes"] > 10 * 2**20 and w["busy_seconds"] > 0 for w in summary.workers)

    rows = {r["image_id"]: r for r in read_rows(out)}
    assert set(rows) == set(ok)
    from distseg.mining.listing import resolve_uri
    from distseg.mining.manifest import mining_settings, shard_settings

    fs, root = resolve_uri(str(out))  # each real shard records what it was mined with (for a killed run's rerun)
    assert shard_settings(fs, root) == mining_settings(cfg.model_dump(mode="json"))
    for image_id, (height, width) in ok.items():
        record = decode_record(rows[image_id])
        assert record.image.shape == (height, width, 3), image_id
        assert set(record.priors) >= {"ucm", "felzenszwalb", "slic"}
        ucm = record.priors["ucm"]
        assert ucm.regions.shape == (height, width) and ucm.ucm.shape == (height, width)
        assert ucm.region_dist.shape == (ucm.regions.max() + 1,) * 2
    errors = read_errors(out)
    assert set(errors) == set(bad)
    for image_id, stage in bad.items():
        assert errors[image_id]["stage"] == stage
        assert errors[image_id]["uri"] in errors[image_id]["message"]  # the message names the file
        assert errors[image_id]["error_type"] == "ImageDecodeError"

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == len(rows) == sum(s["rows"] for s in manifest["shards"])
    assert manifest["errors"] == len(bad) and manifest["num_inputs"] == len(ok) + len(bad)
    assert manifest["priors"] == ["ucm", "felzenszwalb", "slic", "saliency"]

    again = mine(cfg, str(tmp_path / "in"), str(out), progress=False)  # nothing left to do: no duplicates
    assert (again.new, again.skipped, again.mined, again.errors) == (0, len(ok) + len(bad), len(ok), len(bad))
    assert len(read_rows(out)) == len(ok)
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'mine'")
    assert sorted(r.data.metrics["rows"] for r in runs) == [len(ok), len(ok)]  # one MLflow run per call

    # fail_fast stops at the first bad image a worker meets; which of the four that is depends on scheduling
    # (CI met empty.png first once the pool shrank to one actor per 8 images)
    with pytest.raises(MiningError, match=r"(corrupt\.png|truncated\.jpg|text\.jpg|empty\.png): decode failed"):
        mine(
            cfg.model_copy(update={"mine": cfg.mine.model_copy(update={"retry_errors": True})}),
            str(tmp_path / "in"),
            str(tmp_path / "ff"),
            fail_fast=True,
            progress=False,
        )


def _descendants(root: int) -> list[int]:
    """Every live descendant of process `root` (from /proc: parent links), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_sigkill_midway_then_resume_gives_exactly_one_row_per_image(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    n = 24  # one actor, 2 rows per shard: the first shard lands after 2 images, long before the last
    for i in range(n):
        Image.fromarray(scene(i, 96)).save(images / f"img{i:03d}.png")
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "distseg.cli",
        "mine",
        "--input",
        str(images),
        "--output",
        str(out),
        "edges.detector=gradient",
        "mine.rows_per_shard=2",
        "mine.batch_size=1",
        "mine.num_actors=1",
        "ray.num_cpus=2",
        f"workdir={tmp_path / 'work'}",
    ]
    log = tmp_path / "first_run.log"
    for attempt in range(2):  # a second start only where Ray's own start-up timed out (below)
        with open(log, "wb") as sink:
            proc = subprocess.Popen(args, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 600  # Ray's start alone can take minutes on a loaded 2-core machine
        # one actor works through 4 blocks in turn: kill as soon as the first block's shard lands
        while time.time() < deadline and not list((out / "shards").glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        # Ray gives a new local node 30 s (hard-coded in ray._private.node) to register; on a 2-core machine
        # busy with other jobs that can pass, and `ray.init` fails before distseg runs: not what is tested
        if proc.poll() is None or attempt or "timed out during startup" not in log.read_text():
            break
        try:  # what that start left of its Ray processes
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.poll() is None, f"the first run ended before any shard landed: {log.read_text()[-2000:]}"
    assert list((out / "shards").glob("*.parquet")), f"no shard after 600 s: {log.read_text()[-2000:]}"
    # the job and the Ray cluster it started, all at once: every descendant of the job (Ray's daemons
    # and workers, whatever process group they run in), so no worker of the killed run writes on
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    gone = time.time() + 30
    while time.time() < gone and any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in family):
        time.sleep(0.1)
    first = len(read_rows(out))
    assert 0 < first < n, f"the kill should land midway, found {first} of {n} rows"
    # a write killed before its rename leaves a hidden .<name>.tmp (pathlib's glob matches it): never read
    assert not [p for p in (out / "shards").glob("*.tmp") if not p.name.startswith(".")]

    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode and "timed out during startup" in done.stderr:  # Ray's 30-s node start, as above
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"mined {n} images, 0 errors"
    ids = [r["image_id"] for r in read_rows(out)]
    assert sorted(ids) == sorted(f"img{i:03d}" for i in range(n))  # none missing, none duplicated
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == n


def crash_corpus(folder):
    folder.mkdir()
    for i in range(4):
        Image.fromarray(scene(i, 32)).save(folder / f"ok{i}.png")
    Image.fromarray(scene(9, 32)[: CRASH_SHAPE[0], : CRASH_SHAPE[1]]).save(folder / "crash.png")
    return load_config(
        "demo",
        ["mine.priors=[crash_test]", "mine.num_actors=1", "mine.batch_size=1", f"workdir={folder.parent / 'work'}"],
    )


def test_image_that_crashes_its_worker_repeatedly_becomes_an_error_row(tmp_path, local_ray):
    cfg = crash_corpus(tmp_path / "in")
    out = tmp_path / "out"
    # the image segfaults its worker twice (the restarted actor retries it once), then is given up on
    summary = mine(cfg, str(tmp_path / "in"), str(out), progress=False, max_restarts=3, crash_limit=2)
    assert (summary.mined, summary.errors, summary.crashed) == (4, 1, 1)
    assert sorted(r["image_id"] for r in read_rows(out)) == ["ok0", "ok1", "ok2", "ok3"]
    error = read_errors(out)["crash"]
    assert (error["stage"], error["error_type"]) == ("worker_crash", "WorkerCrash")
    assert error["uri"] in error["message"] and "died 2 times" in error["message"]


def test_worker_restarts_are_bounded_and_the_failure_names_the_image(tmp_path, local_ray):
    cfg = crash_corpus(tmp_path / "in")
    # a restart budget smaller than the crashes an image may cause: the job stops instead of looping
    with pytest.raises(MiningError, match=r"its 1 restarts allow.*crash\.png \(2 attempts\).*rerun"):
        mine(cfg, str(tmp_path / "in"), str(tmp_path / "out"), progress=False, max_restarts=1, crash_limit=5)


def test_an_output_mined_with_other_settings_is_refused_before_ray_starts(tmp_path):
    """Rows of one output must agree: mining into a folder whose manifest records another edge detector,
    hierarchy, prior section or image size stops with each differing key (old -> new) named; settings
    a shard row does not depend on (pretraining, the seed) do not matter. Without a manifest (a killed
    run) the shards' metadata is compared."""
    from distseg.mining.manifest import check_settings, mining_settings

    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(0, 32)).save(images / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    old = load_config("demo", ["edges.detector=gradient", f"workdir={tmp_path}"])
    (out / "_manifest.json").write_text(json.dumps({"config": old.model_dump(mode="json")}))

    new = load_config("demo", ["edges.detector=learned", f"workdir={tmp_path}"])
    ray_was_up = ray.is_initialized()  # another test's cluster may be up; this call must not start one
    with pytest.raises(
        MiningError, match=r"out was mined with other settings \(edges\.detector: 'gradient' -> 'learned'\)"
    ):
        mine(new, str(images), str(out), progress=False)
    assert ray.is_initialized() == ray_was_up
    with pytest.raises(MiningError, match=r"hierarchy\.max_regions: 24 -> 30.*new --output"):
        check_settings(load_config("demo", ["edges.detector=gradient", "hierarchy.max_regions=30"]), str(out))
    with pytest.raises(MiningError, match=r"mine\.priors: \['ucm'\] -> \['ucm', 'slic'\]"):
        check_settings(load_config("demo", ["edges.detector=gradient", "mine.priors=[ucm,slic]"]), str(out))
    check_settings(load_config("demo", ["edges.detector=gradient", "pretrain.steps=7", "seed=3"]), str(out))
    check_settings(old, str(tmp_path / "nowhere"))  # a new output: nothing to compare
    # a run killed before it wrote the manifest: its shards' metadata says what they were mined with
    import pyarrow.parquet as pq

    from distseg.shards import shard_schema

    killed = tmp_path / "killed"
    (killed / "shards").mkdir(parents=True)
    schema = shard_schema(old.mine.priors, old.model_dump(mode="json"))
    pq.write_table(schema.empty_table(), killed / "shards" / "part-0.parquet")
    check_settings(load_config("demo", ["edges.detector=gradient", "pretrain.steps=7"]), str(killed))
    with pytest.raises(MiningError, match=r"killed was mined with other settings \(hierarchy\.max_regions: 24 -> 30\)"):
        check_settings(load_config("demo", ["edges.detector=gradient", "hierarchy.max_regions=30"]), str(killed))
    # a prior's own section counts only when that prior is mined; the edges only for ucm
    slic = mining_settings(load_config("demo", ["mine.priors=[slic]"]).model_dump(mode="json"))
    assert "priors.slic.num_regions" in slic and not any(k.startswith(("edges.", "priors.ucm")) for k in slic)


def test_repeated_rows_from_a_late_shard_are_left_out_then_removed_by_the_next_run(tmp_path, local_ray):
    """A shard landing after a run listed what was done (a killed run's worker outliving its driver, or a
    retried write) can repeat images: ingest reads only the shards the manifest lists, and the next
    finished mining run keeps one row per image, rewriting a shard that is partly a repeat."""
    import pyarrow as pa

    from distseg.train.ingest import count_rows, shard_files

    images = tmp_path / "in"
    images.mkdir()
    for i in range(4):
        Image.fromarray(scene(i, 32)).save(images / f"img{i}.png")
    out = tmp_path / "out"
    cfg = load_config("demo", ["edges.detector=gradient", "mine.rows_per_shard=2", f"workdir={tmp_path / 'work'}"])
    assert mine(cfg, str(images), str(out), progress=False, track=False).duplicates == 0
    listed = sorted((out / "shards").glob("*.parquet"))
    rows = pq.read_table(out / "shards").to_pylist()
    assert sorted(r["image_id"] for r in rows) == [f"img{i}" for i in range(4)]

    # img0 moves out of its shard into a late one, beside a repeat of img1 and a whole late copy of another
    table = pq.read_table(out / "shards")
    by_id = {r["image_id"]: i for i, r in enumerate(table.select(["image_id"]).to_pylist())}
    late = table.take([by_id["img0"], by_id["img1"]])
    pq.write_table(late, out / "shards" / "part-99999999-000000-late0001.parquet")
    copy = pq.read_table(listed[-1])
    pq.write_table(copy, out / "shards" / "part-99999999-000000-late0002.parquet")
    for path in listed:
        t = pq.read_table(path)
        pq.write_table(t.filter(pa.compute.not_equal(t.column("image_id"), "img0")), path)

    # ingest: the manifest's shards only (img0 is in none of them now: 3 rows), with a warning naming them
    with pytest.warns(UserWarning, match=r"2 shard file\(s\) not in .*_manifest\.json left out .*late0001"):
        files = shard_files(out)
    assert [f.rsplit("/", 1)[-1] for f in files] == [p.name for p in listed]
    with pytest.warns(UserWarning):
        assert count_rows(out) == 3

    # the next run has nothing to mine, removes the repeated rows and lists every shard left
    repeats = 1 + copy.num_rows  # img1 in the first late shard, all of the second
    summary = mine(cfg, str(images), str(out), progress=False, track=False)
    assert (summary.new, summary.duplicates, summary.mined) == (0, repeats, 4)
    ids = pq.read_table(out / "shards").column("image_id").to_pylist()
    assert sorted(ids) == [f"img{i}" for i in range(4)]
    assert not (out / "shards" / "part-99999999-000000-late0002.parquet").exists()  # all repeats: deleted
    kept = pq.read_table(out / "shards" / "part-99999999-000000-late0001.parquet")
    assert kept.column("image_id").to_pylist() == ["img0"]  # the repeat of img1 dropped, img0 kept
    assert kept.schema.metadata == table.schema.metadata  # the shard's config stays with it
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows"], manifest["duplicates_dropped"]) == (4, repeats)
    assert count_rows(out) == 4  # no warning now: every shard is listed


def test_retrying_errors_leaves_one_error_row_per_image_still_failing(tmp_path, local_ray):
    """mine.retry_errors tries the errors table's images again: one that now decodes becomes a row and
    loses its error row; one that fails again keeps a single error row (its latest), not two."""
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(0, 32)).save(images / "good.png")
    (images / "fixable.png").write_bytes(b"not yet an image")
    (images / "broken.png").write_bytes(b"never an image")
    out = tmp_path / "out"
    cfg = load_config("demo", ["edges.detector=gradient", f"workdir={tmp_path / 'work'}"])
    first = mine(cfg, str(images), str(out), progress=False, track=False)
    assert (first.mined, first.errors) == (1, 2)

    Image.fromarray(scene(1, 32)).save(images / "fixable.png")
    retry = cfg.model_copy(update={"mine": cfg.mine.model_copy(update={"retry_errors": True})})
    again = mine(retry, str(images), str(out), progress=False, track=False)
    assert (again.new, again.mined, again.errors) == (2, 2, 1)
    assert sorted(r["image_id"] for r in read_rows(out)) == ["fixable", "good"]
    errors = pq.read_table(out / "errors").to_pylist()
    assert [e["image_id"] for e in errors] == ["broken"] and errors[0]["stage"] == "decode"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["errors"], manifest["settled_errors_dropped"]) == (1, 2)


def test_mine_inputs_follow_data_root_split_and_limit(tmp_path, msrc_root):
    """`mine --input SOURCE` reads data.split of the source at data.root; data.limit keeps the first N
    ids (sorted); a folder input honours the limit too. No Ray: the listing alone."""
    from distseg.mining.listing import mine_inputs

    root = msrc_root
    cfg = load_config("demo", [f"data.root={root}", "data.split=val"])
    val = mine_inputs("msrc", cfg)
    assert len(val) == 146  # MSRC-v2's val split (md5(id) % 4 == 0)
    cfg.data.limit = 5
    first = mine_inputs("msrc", cfg)
    assert list(first) == sorted(val)[:5] and all(first[i] == val[i] for i in first)
    cfg.data.root = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="nowhere"):  # the source is read from data.root, not its default
        mine_inputs("msrc", cfg)
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"im{3 - i}.png")
    cfg.data.limit = 2
    assert list(mine_inputs(str(tmp_path), cfg)) == ["im0", "im1"]


def test_the_progress_line_also_prints_the_last_count(local_ray, capfd):
    """A run shorter than one interval (12 images on a fast machine) still shows its count once, at the end."""
    from distseg.mining.monitor import MineMonitor
    from distseg.mining.progress import ProgressLine

    monitor = ray.remote(num_cpus=0)(MineMonitor).remote(3)
    try:
        ray.get(monitor.progress.remote())  # started: the line's own 5-s wait is for a live monitor, not a new one
        with ProgressLine(monitor, interval=60):
            pass
    finally:
        ray.kill(monitor)
    assert "mine: 0/3 images, 0 errors" in capfd.readouterr().err.splitlines()  # Ray's log lines may follow
