"""Every shipped config compiles for sm_90 without spilling registers (no GPU needed).

The compile runs in a separate process started with the session (see conftest.py), via the
inspection CLI, so this also checks `python -m stadapter_kernels.inspect` end to end.
"""

import pytest

from stadapter_kernels.fused_triton import configs


@pytest.mark.aot_compile
def test_shipped_configs_do_not_spill_on_sm90(aot_report):
    status, output, rows = aot_report.result(timeout=900)
    assert rows, f"inspect wrote no rows (exit status {status}):\n{output}"
    kernels = {row["kernel"] for row in rows}
    assert kernels == {*configs.TUNED_KERNELS, "weight_gradient"}
    shipped = {(kernel, c.name) for (kernel, _), tile_configs in configs.SHIPPED.items() for c in tile_configs}
    assert {(row["kernel"], row["config"]) for row in rows if row["kernel"] != "weight_gradient"} <= shipped
    # relu's backward compiles with a float32 bottleneck ring (configs.ring_dtype): checked too.
    assert {row["activation"] for row in rows if row["kernel"] == "backward_bottleneck"} == {"gelu", "relu"}
    spilling = [row for row in rows if row["local_bytes"] or row["stack_bytes"]]
    assert not spilling, "configs that spill:\n" + "\n".join(map(str, spilling))
    assert status == 0, output
