"""Every shipped config compiles for sm_80 and sm_90 without spilling registers, specialised as
the launcher's calls are at run time (no GPU needed), and the persistent grid's programs per SM
fit in shared memory.

The compile runs in a separate process started with the session (see conftest.py), via the
inspection CLI, so this also checks `python -m stadapter_kernels.inspect` end to end.
"""

import pytest

from stadapter_kernels.fused_triton import configs


def test_every_bottleneck_bucket_ships_the_same_configs():
    """What makes compiling one CA_PAD bucket (conftest.AOT_ARGUMENTS) cover every bucket."""
    for kernel in configs.TUNED_KERNELS:
        assert len({tile_configs for (name, _), tile_configs in configs.SHIPPED.items() if name == kernel}) == 1


@pytest.mark.aot_compile
def test_shipped_configs_do_not_spill_under_runtime_specialisation(aot_report):
    status, output, rows = aot_report.result(timeout=3000)
    assert rows, f"inspect wrote no rows (exit status {status}):\n{output}"
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert {row["variant"] for row in rows} == set(configs.VARIANTS)
    # Every shipped config of every kernel, in the CA_PAD buckets compiled, on both archs.
    for arch in ("sm_80", "sm_90"):
        compiled = {(row["kernel"], configs.ca_pad(row["bottleneck"]), row["config"]) for row in rows
                    if row["arch"] == arch}
        for bucket in {configs.ca_pad(row["bottleneck"]) for row in rows}:
            shipped = {(kernel, bucket, c.name) for (kernel, pad), tile_configs in configs.SHIPPED.items()
                       if pad == bucket for c in tile_configs}
            assert shipped <= compiled, f"{arch}: not compiled: {sorted(shipped - compiled)}"
    # The runtime's specialisation, not a hand-written signature: prefix = 1 is a constant,
    # and at batch 1 so are B and (for the persistent kernels) one frame per chunk.
    assert all("prefix=1" in row["specialised"] for row in rows if row["kernel"] != "weight_gradient")
    assert all("B=1" in row["specialised"] and "frames_per_chunk=1" in row["specialised"]
               for row in rows if row["batch"] == 1 and row["kernel"] in ("forward", "backward_bottleneck"))
    # relu's backward compiles with a float32 y (configs.ring_dtype): checked too.
    assert {row["activation"] for row in rows if row["kernel"] == "backward_bottleneck"} == {"gelu", "relu"}
    spilling = [row for row in rows if row["local_bytes"] or row["stack_bytes"]]
    assert not spilling, "configs that spill:\n" + "\n".join(map(str, spilling))
    crowded = [row for row in rows if not row["shared_fits"]]
    assert not crowded, "programs per SM that overflow shared memory:\n" + "\n".join(map(str, crowded))
    assert status == 0, output
