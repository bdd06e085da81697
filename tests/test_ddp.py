"""fit() under torchrun with two CPU processes (gloo), unchanged: fit joins the process group
from torchrun's environment, shards the objects by rank, averages the gradients, and only
rank 0 writes. Both ranks must end with the same adapter, even from different inits, and
that adapter must be the one a single process trains on both shards as one batch.

The supervision is made deterministic so the two runs see the same rays: one whole-view
patch of view 0 per object (no random pixels), no LoRA dropout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.training.config import TrainConfig
from utils.training.lora import add_lora, lora_state_dict
from utils.training.train import fit

REPO = Path(__file__).resolve().parents[1]


def config_of(batch_size: int) -> TrainConfig:
    """The run both ways: per process `batch_size` objects, one 16 x 16 patch = all of view 0."""
    return TrainConfig(
        max_steps=2, lr=1e-2, batch_size=batch_size, sampling="patches", patch_size=16,
        rays_per_object=16 * 16, lambda_lpips=0.0, val_every=1, val_objects=1,
        val_rays_per_view=64, checkpoint_every=1, progress=False,
    )  # fmt: skip


class StepRecorder:
    """After every optimiser step: the (averaged, clipped) gradients it applied, the adapter."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_step(self, step, metrics):
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.steps.append(
            {
                "grads": {n: p.grad.clone() for n, p in trainable.items()},
                "adapter": {k: v.clone() for k, v in lora_state_dict(self.model).items()},
            }
        )


WORKER = """
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tsr.model import TSR
from utils.data.dataset import MultiViewDataset
from utils.training.lora import add_lora, lora_state_dict
from utils.training.config import TrainConfig
from utils.training.train import fit

sys.path.insert(0, sys.argv[3])  # the tests folder: the settings the reference run shares
from test_ddp import StepRecorder, config_of

torch.set_num_threads(1)
root, out = sys.argv[1], Path(sys.argv[2])


class RecordingDataset(MultiViewDataset):
    seen = []

    def __getitem__(self, index):
        self.seen.append(self.object_ids[index])
        return super().__getitem__(index)


# a different LoRA init on each rank: fit() must start every rank from rank 0's weights
model = add_lora(
    TSR.from_pretrained("tiny"), r=4, alpha=4, dropout=0.0, seed=int(os.environ["RANK"])
)
initial = {k: v.clone() for k, v in lora_state_dict(model).items()}
size = model.config.cond_image_size
train = RecordingDataset(root, "train", n_supervision_views=1, cond_size=size)
val = MultiViewDataset(root, "val", n_supervision_views=3, cond_size=size)
recorder = StepRecorder(model)  # called on rank 0 only: fit's callbacks are rank 0's
fit(model, train, config_of(1), val_dataset=val, callbacks=[recorder], output_dir=out / "run")
result = {
    "adapter": lora_state_dict(model), "initial": initial, "seen": RecordingDataset.seen,
    "steps": recorder.steps,
}
torch.save(result, out / f"rank{dist.get_rank()}_of_{dist.get_world_size()}.pt")
dist.destroy_process_group()
"""


def test_two_cpu_processes_end_with_the_same_adapter(tmp_path):
    root = tmp_path / "data"
    prepare_dataset(root, families=("primitives",), n_objects=6, n_views=4, size=16, workers=1)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp_path / "worker.py"), str(root), str(tmp_path), str(Path(__file__).parent),
    ]  # fmt: skip
    # a session of its own, so a hang can be ended with the workers, not just the launcher
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        pytest.fail(f"torchrun hung:\n{output[-3000:]}")
    assert launcher.returncode == 0, output[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}_of_2.pt", weights_only=True) for r in (0, 1)]
    lora_a = [k for k in ranks[0]["initial"] if "lora_A" in k]
    assert lora_a and not any(
        torch.equal(ranks[0]["initial"][k], ranks[1]["initial"][k]) for k in lora_a
    )  # the ranks did start apart
    for key, value in ranks[0]["adapter"].items():
        assert torch.equal(value, ranks[1]["adapter"][key]), f"ranks disagree on {key}"
    trained = [
        k for k, v in ranks[0]["adapter"].items() if not torch.equal(v, ranks[0]["initial"][k])
    ]
    assert len(trained) == len(ranks[0]["adapter"])  # every adapter matrix moved
    # each rank trained on its own shard: together one pass over the 4 train objects
    seen = [set(rank["seen"]) for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]
    # rank 0 alone wrote: one record per step and validation, one adapter, one checkpoint
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 1, 1, 2, 2]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (
        len(torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["rng"]) == 2
    )

    # one process, both shards as one batch of 2, from rank 0's init: the same gradients
    # (the mean over the 2 objects) and so the same adapter after every step
    torch.manual_seed(0)  # rank 0's seed: its LoRA A
    single = add_lora(TSR.from_pretrained("tiny"), r=4, alpha=4, dropout=0.0)
    size = single.config.cond_image_size
    train = MultiViewDataset(root, "train", n_supervision_views=1, cond_size=size)
    val = MultiViewDataset(root, "val", n_supervision_views=3, cond_size=size)
    recorder = StepRecorder(single)
    fit(
        single, train, config_of(batch_size=2), val_dataset=val, callbacks=[recorder],
        output_dir=tmp_path / "single",
    )  # fmt: skip
    assert len(recorder.steps) == len(ranks[0]["steps"]) == 2
    for together, apart in zip(recorder.steps, ranks[0]["steps"], strict=True):
        for name, grad in together["grads"].items():
            assert grad.abs().max() > 0 or "lora_A" in name  # A has none while B = 0
            torch.testing.assert_close(apart["grads"][name], grad, rtol=1e-4, atol=1e-8)
        for key, value in together["adapter"].items():
            torch.testing.assert_close(apart["adapter"][key], value, rtol=1e-4, atol=1e-6)
