"""What this build's Triton backend offers the check, found rather than assumed.

Issue 16 adds an API to `stadapter_kernels.fused_triton.configs`: the variants ("fused",
"two_gemm"), the shipped configs, a way to force one, and the per-device table `auto` reads.
The check must also run on a build without it (and report "not available in this build" for
what needs it), so every use of that API goes through this module.
"""

from __future__ import annotations

import contextlib


class NotInThisBuild(Exception):
    """The Triton backend of this build lacks what a check needs; the message says what."""


def _configs():
    from stadapter_kernels.fused_triton import configs

    return configs


def variants() -> tuple[str, ...]:
    """The Triton variants this build can run; before issue 16 only the fused one."""
    listed = getattr(_configs(), "VARIANTS", None)
    return tuple(listed) if listed else ("fused",)


@contextlib.contextmanager
def forced_variant(variant: str):
    """Run the Triton backend as `variant` inside the block."""
    if variants() == ("fused",) and variant == "fused":
        yield  # the only variant there is
        return
    raise NotInThisBuild(f"forcing the {variant!r} variant is not available in this build")
