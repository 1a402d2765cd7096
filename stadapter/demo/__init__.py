"""The offline demo (`stadapter demo`) and its parts, reusable by other demos and tests:

- `stadapter.demo.digits`: the moving-digits video generator (`write_moving_digits`,
  `MotionClass("left", digit=3).name == "a 3 moving left"`);
- `stadapter.demo.frame_vit`: the tiny timm ViT pretrained on single frames
  (`pretrain_frame_vit`, `FrameViTConfig`);
- `stadapter.demo.run`: the demo itself (`run(DemoConfig(), output)`, `main(argv)`).
"""

from .digits import MOTIONS, MotionClass, digit_images, render_video, write_moving_digits
from .frame_vit import FrameViTConfig, build_frame_vit, pretrain_frame_vit

__all__ = ["MOTIONS", "FrameViTConfig", "MotionClass", "build_frame_vit", "digit_images", "pretrain_frame_vit",
           "render_video", "write_moving_digits"]
