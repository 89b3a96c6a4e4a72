"""Pretraining end to end on a real local Ray cluster: mine synthetic shards, train with 2 workers,
resume by name, and survive a worker process killed mid-run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distseg.checkpoint import load_embedding_model
from distseg.cluster import shutdown_ray
from distseg.config import PretrainConfig, load_config
from distseg.train.loop import lr_at

TINY = [
    "data.num_images=16",
    "data.image_size=64",
    "mine.max_side=64",
    "hierarchy.max_regions=12",
    "model.head_channels=16",
    "model.embed_dim=8",
    "pretrain.batch_size=2",
    "pretrain.crop=48",
    "pretrain.num_workers=2",
    "pretrain.cpus_per_worker=1",
    "pretrain.log_every=1",
    "ray.num_cpus=3",
    "mine.priors=[ucm,saliency]",
    "mine.num_actors=1",  # not the 3 logical CPUs' pool: each mining actor loads torch and the edge network
]


@pytest.fixture(autouse=True)
def _ray_down():
    yield
    shutdown_ray()


def tiny_config(workdir: Path, *extra: str):
    return load_config("demo", [f"workdir={workdir}", "name=tiny", *TINY, *extra])


def mlflow_metrics(cfg, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.workdir))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_lr_schedules():
    step = PretrainConfig(steps=100, lr=1.0, schedule="step", step_milestones=[0.5, 0.8], step_gamma=0.1)
    assert [lr_at(s, step) for s in (0, 49, 50, 80, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    poly = PretrainConfig(steps=100, lr=1.0, schedule="poly", poly_power=1.0)
    assert lr_at(25, poly) == pytest.approx(0.75)
    warm = PretrainConfig(steps=100, lr=1.0, schedule="constant", warmup_steps=10)
    assert lr_at(0, warm) == pytest.approx(0.1) and lr_at(10, warm) == 1.0


@pytest.mark.parametrize("verb", ["pretrain", "tune"])
@pytest.mark.parametrize("flag", ["--shards", "--data"])  # --data: the old name, still accepted
def test_a_shards_folder_without_shards_fails_before_ray_starts(tmp_path, verb, flag):
    """A wrong --shards is named at once; before, `tune` started Ray and ran every trial into the error."""
    import ray
    from typer.testing import CliRunner

    from distseg.cli import app

    empty = tmp_path / "mined"
    empty.mkdir()
    args = ["--config", "demo"] if verb == "pretrain" else ["--space", "demo"]
    result = CliRunner().invoke(app, [verb, *args, flag, str(empty), f"workdir={tmp_path}"])
    assert result.exit_code == 1, result.output
    assert f"no Parquet shards under {empty}" in " ".join(result.output.split())
    assert not ray.is_initialized()


def test_an_error_names_a_long_bracketed_path_whole_on_one_line(tmp_path):
    """The CLI's errors are neither folded at the console's width (a path in a job's log stays whole, to copy
    or grep) nor read as markup (rich took "[v2]" for a style tag and dropped it)."""
    from typer.testing import CliRunner

    from distseg.cli import app

    empty = tmp_path / ("mined [v2] " + "x" * 120)
    empty.mkdir()
    result = CliRunner().invoke(app, ["pretrain", "--config", "demo", "--shards", str(empty), f"workdir={tmp_path}"])
    assert result.exit_code == 1, result.output
    line = f"error: no Parquet shards under {empty} (run `distseg mine` and pass its --output folder)"
    assert line in result.output.splitlines(), result.output


def test_mine_pretrain_two_workers_then_resume(tmp_path, capfd):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.tracking import tracking_uri
    from distseg.train.pretrain import pretrain

    cfg = tiny_config(tmp_path, "pretrain.steps=4", "pretrain.checkpoint_every=2")
    first = pretrain(cfg)
    assert json.loads((first.checkpoint / "meta.json").read_text())["step"] == 4
    shards = Path(first.shards)
    assert json.loads((shards / "_manifest.json").read_text())["rows"] == 16
    state = torch.load(first.checkpoint / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model, loaded_cfg = load_embedding_model(first.checkpoint)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 8, 12, 12)
    loss_steps = [s for s, _ in mlflow_metrics(cfg, first.run_id, "loss")]
    assert loss_steps == [1, 2, 3, 4]

    # the same name with more steps resumes from step 4 (no step trained twice) in the same MLflow run
    resumed = pretrain(
        tiny_config(tmp_path, "pretrain.steps=6", "pretrain.checkpoint_every=2", f"pretrain.shards={shards}")
    )
    assert resumed.run_id == first.run_id
    assert "pretrain: resuming run 'tiny'" in capfd.readouterr().out  # a rerun says it resumes
    assert json.loads((resumed.checkpoint / "meta.json").read_text())["step"] == 6
    assert [s for s, _ in mlflow_metrics(cfg, first.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "images_per_s"):
        assert len(mlflow_metrics(cfg, first.run_id, key)) == 6

    # the same run once more: it is at its end, so the loop trains nothing and reports the last checkpoint's
    # metrics once, to Ray Train only. A Tune trial restored after its training ended (its sweep killed
    # just then) gives Tune that as its result; without it `tune --resume` failed ("Trial returned a result
    # which did not include the specified metric(s) `probe_score`")
    from ray import cloudpickle

    from distseg.train.pretrain import build_trainer, prepare

    reports = tmp_path / "reports.jsonl"
    again = prepare(
        tiny_config(tmp_path, "pretrain.steps=6", "pretrain.checkpoint_every=2", f"pretrain.shards={shards}")
    )
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Train controller runs RecordReports
    try:
        build_trainer(again, callbacks=[RecordReports(str(reports))]).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    rows = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [r["step"] for r in rows] == [6], rows
    assert rows[0]["loss"] == pytest.approx(mlflow_metrics(cfg, first.run_id, "loss")[-1][1], rel=1e-6)
    assert len(mlflow_metrics(cfg, first.run_id, "loss")) == 6  # nothing logged twice

    # maskcontrast (key encoder, queue, saliency head all-reduced by hand) started from that checkpoint
    mc = pretrain(
        tiny_config(
            tmp_path,
            "name=mc",
            "pretrain.method=maskcontrast",
            "pretrain.prior=saliency",
            "pretrain.steps=2",
            f"pretrain.shards={shards}",
            f"model.init_from={resumed.checkpoint}",
        )
    )
    assert mc.run_id != first.run_id
    assert json.loads((mc.checkpoint / "meta.json").read_text())["step"] == 2
    assert load_config(str(mc.checkpoint / "config.yaml")).model.init_from == str(resumed.checkpoint)
    loss_state = torch.load(mc.checkpoint / "loss.pt", weights_only=True)
    assert loss_state["queue"].shape == (128, 8) and "saliency_head.weight" in loss_state
    assert (mc.checkpoint / "key_encoder.pt").is_file()
    assert len(mlflow_metrics(cfg, mc.run_id, "proto_acc")) == 2

    # resuming that run with another loss is refused on the driver, before any worker starts (with the
    # default max_failures=3 the worker group used to be started and failed four times), naming the run and
    # what to do; the run's MLflow record is left as it was
    refused = CliRunner().invoke(
        app, ["pretrain", "--config", "demo", "--shards", str(shards), "--name", "mc", f"workdir={tmp_path}", *TINY]
    )
    assert refused.exit_code == 1, refused.output
    message = "".join(refused.output.split())  # rich folds long lines (paths too) at the console's width
    expected = r"error:run'mc'cannotresumefrom\S+/mc/checkpoint_\S+:itwassavedbyadifferentmodel,lossoroptimizer\S+"
    assert re.search(expected + "Startanewrunwithanothername=", message), refused.output
    assert MlflowClient(tracking_uri(tmp_path)).get_run(mc.run_id).info.status == "FINISHED"

    # a method that is one module plus one YAML (tests/plugins), unknown to distseg: the config gains
    # `losses.toy`, the Ray workers import the plugin, and the run leaves a checkpoint and its own metric
    toy_yaml = Path(__file__).parent / "plugins" / "toy.yaml"
    try:
        toy_cfg = load_config(toy_yaml, [f"workdir={tmp_path}", "name=toy", *TINY, "pretrain.steps=2",
                                         "pretrain.num_workers=1", f"pretrain.shards={shards}"])  # fmt: skip
        assert toy_cfg.pretrain.method == "toy" and toy_cfg.losses.toy.weight == 2.0
        assert Path(toy_cfg.plugins[0]).is_absolute()  # the workers run in another directory
        toy = pretrain(toy_cfg)
        meta = json.loads((toy.checkpoint / "meta.json").read_text())
        assert meta["step"] == 2 and meta["mlflow_run_id"] == toy.run_id and meta["config_hash"] and meta["git_sha"]
        saved = load_config(toy.checkpoint / "config.yaml")
        assert saved.pretrain.method == "toy" and saved.losses.toy.weight == 2.0
        agreement = mlflow_metrics(cfg, toy.run_id, "toy_agreement")
        assert [s for s, _ in agreement] == [1, 2] and all(-1 <= v <= 1 for _, v in agreement)
    finally:
        from distseg.methods import METHODS

        METHODS.unregister("toy")
        for module in [m for m in sys.modules if m.startswith("distseg_plugin_toy_method")]:
            del sys.modules[module]


class RecordReports:
    """A Ray Train callback (made a `UserCallback` when first built) appending each report's rank-0 metrics to
    a JSON-lines file."""

    def __new__(cls, path: str):
        import ray.train

        class Recorder(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps(metrics[0]) + "\n")

        return Recorder()


def _train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmdline:
                pids.append(int(entry.name))
    return sorted(pids)


@pytest.mark.slow  # a worker-group restart takes minutes on 2 loaded cores; `make test-slow` runs it
def test_killed_worker_resumes_from_checkpoint_and_finishes(tmp_path):
    from distseg.train.pretrain import pretrain

    steps = 24
    cfg = tiny_config(tmp_path, f"pretrain.steps={steps}", "pretrain.checkpoint_every=4", "pretrain.max_failures=2")
    storage = tmp_path / "ray_results" / "tiny"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=pretrain(cfg)), daemon=True)
    thread.start()
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and thread.is_alive():
        if list(storage.glob("checkpoint_*")) and len(_train_worker_pids()) >= 2:
            killed = _train_worker_pids()[-1]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    assert killed is not None, "no checkpoint appeared while both workers were alive"
    thread.join(timeout=300)
    assert "result" in outcome, "pretraining did not finish after the worker was killed"
    meta = json.loads((outcome["result"].checkpoint / "meta.json").read_text())
    assert meta["step"] == steps
    state = torch.load(outcome["result"].checkpoint / "model.pt", weights_only=True)
    assert len(state) > 0
    # the loss history shows the restart: steps after the last checkpoint before the kill were redone
    steps_logged = [s for s, _ in mlflow_metrics(cfg, outcome["result"].run_id, "loss")]
    assert max(steps_logged) == steps and set(steps_logged) == set(range(1, steps + 1))


def test_local_step_trains_one_device_without_ray():
    """distseg.train.loop.LocalStep (jobs/pretrain_local.py, jobs/benchmark_device.py): the loop's step on
    one device, no Ray: two steps on a hand-made batch move the weights and give a finite loss."""
    import ray

    from distseg.train.loop import LocalStep

    cfg = load_config("demo", [*TINY[:7], "pretrain.crop=32", "pretrain.steps=2", "pretrain.warmup_steps=0"])
    B, S = 2, 32
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    seg = (xs >= S // 2).long() + 2 * (ys >= S // 2).long()
    batch = {
        "view1": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8),
        "view2": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8),
        "seg1": seg.expand(B, S, S).to(torch.int16),
        "seg2": seg.expand(B, S, S).to(torch.int16),
        "coord1": torch.stack([ys, xs]).expand(B, 2, S, S).int(),
        "coord2": torch.stack([ys, xs]).expand(B, 2, S, S).int(),
        "dist": torch.ones(B, 12, 12),
        "image_index": torch.arange(B),
    }
    step = LocalStep(cfg, torch.device("cpu"), amp=False)
    before = {k: v.clone() for k, v in step.net.state_dict().items()}
    losses = [float(step(batch, i)["loss"]) for i in range(2)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], v) for k, v in step.net.state_dict().items())
    assert not ray.is_initialized()


def test_resume_check_loads_the_checkpoint_into_what_the_config_builds(tmp_path):
    """train.loop.check_resumable (the driver's check before a resumed run starts its workers): the
    checkpoint of a hiergroup run fits the same config, even one whose init files are gone, and not a
    config with another method or network; no Ray, no worker."""
    from distseg.checkpoint import CheckpointMismatch, save_checkpoint
    from distseg.train.loop import build_step, check_resumable

    cfg = load_config("demo", [*TINY[:7], "pretrain.crop=32"])
    _, net, loss_fn, optimizer = build_step(cfg, torch.device("cpu"))
    net(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()  # Adam's moments exist, as in a checkpoint written after training steps
    folder = save_checkpoint(
        tmp_path / "checkpoint_0", cfg=cfg, step=1, model=net.state_dict(), optimizer=optimizer.state_dict(),
        loss=loss_fn.state_dict(),
    )  # fmt: skip
    check_resumable(cfg, folder)
    gone = load_config("demo", [*TINY[:7], f"model.init_from={tmp_path / 'gone'}", f"model.weights={tmp_path / 'x'}"])
    check_resumable(gone, folder)
    for change in ("pretrain.method=maskcontrast", "model.embed_dim=16", "pretrain.optimizer=sgd"):
        with pytest.raises(CheckpointMismatch, match=f"checkpoint {folder}: "):
            check_resumable(load_config("demo", [*TINY[:7], change]), folder)

    # a resume takes the optimizer's moments from the checkpoint and its weight decay from the config
    from distseg.checkpoint import restore_checkpoint
    from distseg.train.loop import restore_step

    saved_decay = optimizer.param_groups[0]["weight_decay"]
    decay = load_config("demo", [*TINY[:7], f"pretrain.weight_decay={saved_decay + 0.125}"])
    step = build_step(decay, torch.device("cpu"))
    meta = restore_step(lambda **objects: restore_checkpoint(folder, "cpu", **objects), *step, source="x")
    assert meta["step"] == 1
    moments = step[3].state_dict()["state"]
    assert moments and all(
        torch.equal(moments[k]["exp_avg"], v["exp_avg"]) for k, v in optimizer.state_dict()["state"].items()
    )
    assert step[3].param_groups[0]["weight_decay"] == saved_decay + 0.125

    # a method's extra state that does not fit (MaskContrast's key encoder of another width) is refused as
    # the network is: the driver's check names the folder, a worker's message says what to do
    from distseg.train.engine import resume_refused

    mc = load_config("demo", [*TINY[:7], "pretrain.method=maskcontrast"])
    method, net, loss_fn, optimizer = build_step(mc, torch.device("cpu"))
    wide = build_step(
        load_config("demo", [*TINY[:7], "pretrain.method=maskcontrast", "model.embed_dim=16"]), torch.device("cpu")
    )
    folder = save_checkpoint(
        tmp_path / "mc", cfg=mc, step=1, model=net.state_dict(), optimizer=optimizer.state_dict(),
        loss=loss_fn.state_dict(), **wide[0].extra_state(),
    )  # fmt: skip
    assert (folder / "key_encoder.pt").is_file()
    with pytest.raises(
        CheckpointMismatch, match=f"checkpoint {folder}: Error.s. in loading state_dict for HypercolumnNet"
    ):
        check_resumable(mc, folder)
    with pytest.raises(
        CheckpointMismatch,
        match="run 'demo' cannot resume from .*mc: it was saved by .*Error.s. in loading.*Start a new",
    ):
        restore_step(
            lambda **objects: restore_checkpoint(folder, "cpu", **objects), *build_step(mc, torch.device("cpu")),
            source="x", refuse=lambda err: resume_refused("demo", str(folder), err),
        )  # fmt: skip

    # the folder checked is the one Ray Train resumes from: its snapshot's latest, not the highest step on
    # disk (a later folder half uploaded when the run died: meta.json there, model.pt not)
    from distseg.train.pretrain import refuse_unfit_resume, resume_checkpoint

    half = tmp_path / "checkpoint_1"
    half.mkdir()
    (half / "meta.json").write_text(json.dumps({"step": 2}))
    assert resume_checkpoint(str(tmp_path)) is None  # no snapshot: Ray starts afresh, nothing to check
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_0"}}))
    assert resume_checkpoint(str(tmp_path)) == f"{tmp_path}/checkpoint_0"
    refuse_unfit_resume(cfg, str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="run 'demo' cannot resume from .*checkpoint_0: it was saved by"):
        refuse_unfit_resume(load_config("demo", [*TINY[:7], "model.embed_dim=16"]), f"file://{tmp_path}")
    snapshot.write_text(json.dumps({"latest_checkpoint_result": None}))  # another Ray's format: the workers check
    assert resume_checkpoint(str(tmp_path)) is None


def _two_runs_of_local_steps(overrides: list[str], steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Two fresh LocalSteps of the demo config on one hand-made 128-px batch of 8 images (quadrant
    segments, 2 torch threads): each run's weights after `steps` steps."""
    from distseg.train.loop import LocalStep

    cfg = load_config("demo", ["pretrain.warmup_steps=0", *overrides])
    B, S = 8, 128
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    seg = ((xs >= S // 2).long() + 2 * (ys >= S // 2).long()).expand(B, S, S).to(torch.int16)
    images = torch.Generator().manual_seed(0)
    batch = {
        "view1": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8, generator=images),
        "view2": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8, generator=images),
        "seg1": seg,
        "seg2": seg,
        "coord1": torch.stack([ys, xs]).expand(B, 2, S, S).int(),
        "coord2": torch.stack([ys, xs]).expand(B, 2, S, S).int(),
        "dist": torch.rand(B, 12, 12, generator=images),
        "image_index": torch.arange(B),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weights = []
        for _ in range(2):
            step = LocalStep(cfg, torch.device("cpu"), amp=False)
            for i in range(steps):
                step(batch, i)
            weights.append({k: v.clone() for k, v in step.net.state_dict().items()})
        return weights
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def test_same_seed_same_weights_bit_for_bit_with_two_threads():
    """`pretrain.deterministic` (default: on for CPU): the backward of the losses' pixel gathers
    (index_put_ with accumulate) otherwise adds gradients in thread order, and two runs of the same seed
    drift apart from the first steps (the demo: loss 2.7187 against 2.7222 after 20 steps)."""
    from distseg.train.engine import use_deterministic

    a, b = _two_runs_of_local_steps([])
    assert all(torch.equal(a[k], b[k]) for k in a)
    try:
        assert use_deterministic(None, torch.device("cpu")) and torch.are_deterministic_algorithms_enabled()
        assert not use_deterministic(None, torch.device("cuda")) and not torch.are_deterministic_algorithms_enabled()
        assert not use_deterministic(False, torch.device("cpu"))
    finally:
        torch.use_deterministic_algorithms(False)


_SAME_START = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from distseg.config import load_config
from distseg.methods import Views
from distseg.train.loop import SameStart, build_step


def run(rank, world, store, out, wrapped):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(7 + rank)  # as WorkerSession seeds each rank: seed + rank
    found = {}
    for method in ("concepts", "maskcontrast"):
        cfg = load_config(method, ["model.init_from=null", "model.backbone=resnet18", "model.head_channels=16",
                                   "model.embed_dim=8"])
        wrap = SameStart(DistributedDataParallel, world) if wrapped else None
        m, net, loss_fn, _ = build_step(cfg, torch.device("cpu"), wrap)
        assert wrap.model.module is net if wrapped else True
        states = {"net": net.state_dict(), "loss": loss_fn.state_dict(), **m.extra_state()}
        found[method] = {part: {k: v.clone() for k, v in state.items()} for part, state in states.items()}
        if wrapped:  # two steps on each rank's own images: the queue / bank gets every rank's entries
            seg = torch.zeros(2, 64, 64, dtype=torch.long)
            seg[:, :, 32:] = 1
            if method == "concepts":
                seg[:, 32:] += 2
            empty = -1 if method == "concepts" else 0  # no segment (concepts) / no foreground (maskcontrast)
            if rank == 1:  # rank 1: its second image empty at step 0, its whole batch at step 1
                seg[1] = empty
            for step in range(2):
                if rank == 1 and step == 1:
                    seg[:] = empty
                views = Views(images=torch.randn(4, 3, 64, 64), seg1=seg, seg2=seg, dist=torch.ones(2, 4, 4),
                              image_ids=torch.tensor([100 * rank + 10 * step, 100 * rank + 10 * step + 1]))
                m.forward(wrap.model, views)
            found[method]["after"] = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    torch.save(found, f"{out}/rank{rank}_{int(wrapped)}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    out, store, wrapped = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    torch.multiprocessing.spawn(run, args=(2, store, out, wrapped), nprocs=2)
"""


def test_every_rank_starts_from_rank_zeros_network_and_loss_state(tmp_path):
    """Two real torch.distributed (gloo) ranks seeded as Ray Train workers are (seed + rank) build the
    concepts and MaskContrast steps through train.loop.SameStart, with torch's DDP as Ray Train's
    prepare_model wraps on CPU: the network, the loss's state (concepts dictionary, MaskContrast's
    queue and saliency head) and the key encoder are rank 0's on both ranks. Without SameStart
    (the control) the dictionaries differ, so the comparison can fail."""
    import subprocess
    import sys

    script = tmp_path / "same_start.py"
    script.write_text(_SAME_START)
    for wrapped in ("1", "0"):
        # a file store: a free TCP port found here could be taken before gloo binds it (a shared CI machine)
        store = tmp_path / f"store_{wrapped}"
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(store), wrapped],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    same = [torch.load(tmp_path / f"rank{r}_1.pt", weights_only=True) for r in (0, 1)]
    for method in ("concepts", "maskcontrast"):
        for part, state in same[0][method].items():
            for key, value in state.items():
                assert torch.equal(value, same[1][method][part][key]), (method, part, key)
    assert set(same[0]["maskcontrast"]) == {"net", "loss", "key_encoder", "after"}
    # after two steps on different images, each rank's queue / bank holds both ranks' entries, in rank
    # order (gather_rows): rank 0's two images and rank 1's non-empty ones (none at step 1: that rank
    # takes the early way out of the loss and still joins the gather)
    queue = same[0]["maskcontrast"]["after"]
    assert int(queue["queue_ptr"]) == 5 and queue["queue_known"].sum() == 5
    assert queue["queue_ids"][:5].tolist() == [0, 1, 100, 10, 11]
    bank = same[0]["concepts"]["after"]
    assert sorted(bank["bank_ids"][0, : int(bank["bank_count"][0])].unique().tolist()) == [0, 1, 100]
    assert sorted(bank["bank_ids"][1, : int(bank["bank_count"][1])].unique().tolist()) == [10, 11]
    apart = [torch.load(tmp_path / f"rank{r}_0.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(apart[0]["concepts"]["loss"]["dictionary"], apart[1]["concepts"]["loss"]["dictionary"])
    conv1 = "backbone.body.conv1.weight"
    for part in ("net", "key_encoder"):
        assert not torch.equal(apart[0]["maskcontrast"][part][conv1], apart[1]["maskcontrast"][part][conv1])
