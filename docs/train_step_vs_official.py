"""Clips/s and peak memory of the `stadapter train` step, fused ST-Adapters vs the official module.

Both runs are the same `stadapter.train.Trainer` (same data path, shapes, precision, optimizer);
`--impl official` swaps every injected `STAdapter` for the official ST-Adapter forward
(`benchmarks.providers.OfficialAdapter`: nn.Linear, a permute to NCTHW, nn.Conv3d and an in-place
residual) holding the same weights, before the optimizer and DDP are built. Run from the repository
root, once per implementation, alone or under torchrun:

    PYTHONPATH=. python docs/train_step_vs_official.py --train-data DIR --impl fused
    PYTHONPATH=. torchrun --nproc_per_node 2 docs/train_step_vs_official.py --train-data DIR --impl official

Prints one JSON line (rank 0): clips/s over the timed steps (after one warm-up step) and the peak
resident memory of each process (getrusage ru_maxrss: weights, activations, the data pipeline).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.providers import OfficialAdapter
from stadapter.data import VideoDataset
from stadapter.inject import CHILD_NAMES, adapted_blocks, adapter_config
from stadapter.train import TrainConfig, build_model
from stadapter.train.distributed import all_gather_objects, init_distributed, shutdown
from stadapter.train.trainer import Trainer, peak_rss_mib


def swap_in_official_adapters(model) -> int:
    """Replace each injected adapter of `model.backbone` by an OfficialAdapter with its weights."""
    config = adapter_config(model.backbone)
    count = 0
    for _, block in adapted_blocks(model.backbone):
        for position in config.positions:
            fused = getattr(block, CHILD_NAMES[position])
            official = OfficialAdapter(fused.dim, fused.bottleneck, fused.kernel_t).to(fused.fc1.weight.device)
            official.load_state_dict(fused.state_dict())
            setattr(block, CHILD_NAMES[position], official)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--impl", choices=("fused", "official"), required=True)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per process")
    parser.add_argument("--amp", default="none")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    config = TrainConfig(train_data=args.train_data, backbone="vit_base_patch16_clip_224", bottleneck=384,
                         num_frames=8, batch_size=args.batch_size, epochs=1, num_workers=1, amp=args.amp,
                         threads=args.threads, output_dir="/tmp/train_step_vs_official", auto_resume=False,
                         save_every=0, progress=False)
    info = init_distributed("cpu")
    try:
        torch.manual_seed(config.seed)
        model = build_model(config, VideoDataset.from_path(args.train_data).num_classes)
        if args.impl == "official":  # before the Trainer builds optimizer and DDP on its parameters
            swap_in_official_adapters(model)
        trainer = Trainer(config, info, model=model)
        kinds = {type(m).__name__ for _, b in adapted_blocks(trainer.model.backbone)
                 for m in b.children() if m.__class__.__name__ in ("STAdapter", "OfficialAdapter")}
        loader = iter(trainer.epoch_loader(0))
        batches = [next(loader) for _ in range(args.steps + 1)]
        trainer.model.train()
        trainer.forward_backward(batches[0])
        trainer.optimizer_step()
        start = time.perf_counter()
        for batch in batches[1:]:
            trainer.forward_backward(batch)
            trainer.optimizer_step()
        seconds = time.perf_counter() - start
        peaks = all_gather_objects(peak_rss_mib(), info)
        if info.is_main:
            clips = args.steps * trainer.global_batch
            print(json.dumps({"impl": args.impl, "adapter_modules": sorted(kinds), "processes": info.world_size,
                              "global_batch": trainer.global_batch, "steps": args.steps, "amp": args.amp,
                              "threads": torch.get_num_threads(), "clips_per_s": clips / seconds,
                              "seconds_per_step": seconds / args.steps, "peak_rss_mib_per_process": peaks}))
    finally:
        shutdown(info)


if __name__ == "__main__":
    main()
