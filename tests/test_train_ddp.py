"""DDP through the trainer: a 2-process step (gloo, CPU) gives the gradients of one process on
the same global batch.

Both runs use `Trainer` on the same mp4 files: a DistributedSampler over 2 processes deals
the epoch's permutation out in turn, so 2 processes x 2 clips see the clips 1 process x 4
sees, with the same augmentation (drawn per sample). Dropout is off (its masks differ per
process by design) and the adapters start random, so every tensor gets a gradient.
"""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from test_train import TINY_VIT, tiny_config, write_tiny_videos

from stadapter.train.distributed import init_distributed, shutdown
from stadapter.train.trainer import Trainer


def first_step_gradients(config) -> dict[str, torch.Tensor]:
    info = init_distributed("cpu")
    try:
        trainer = Trainer(config, info)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # identical on every process: DDP does not broadcast after wrapping
            for parameter in trainer.trainable:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        batch = next(iter(trainer.epoch_loader(0)))
        trainer.forward_backward(batch)
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    finally:
        shutdown(info)


def _worker(rank: int, world_size: int, store: str, config, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    gradients = first_step_gradients(config)
    if rank == 0:
        torch.save(gradients, out)


def test_two_process_step_matches_one_process_on_the_same_global_batch(tmp_path):
    videos = write_tiny_videos(tmp_path)
    settings = dict(dropout=0.0, auto_resume=False, positions=("pre_attn", "pre_mlp"))
    single = first_step_gradients(tiny_config(*videos, tmp_path / "one", batch_size=4, **settings))
    out = str(tmp_path / "ddp_gradients.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), tiny_config(*videos, tmp_path / "two", batch_size=2,
                                                                      **settings), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp.keys() == single.keys() and any("st_adapter" in k for k in ddp)
    # The last block's pre-MLP adapter acts after the last attention, where the patch tokens no
    # longer reach the class token the head reads: its gradient is zero by construction.
    dead = f"backbone.blocks.{TINY_VIT['depth'] - 1}.st_adapter_pre_mlp."
    for name in single:
        assert name.startswith(dead) or single[name].abs().sum() > 0, name
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
