"""The report never mixes settings and says what it leaves out: rows measured with other
settings go to a report of their own, rows of cells no longer in the run's config are
left out with a note, CPU and CUDA memory figures have columns of their own, the
operators no FLOP counter counts are listed, and a backed-off batch is reported as the
batch used."""
import json

from attnbench import results as R
from attnbench.report import build as B
from attnbench.report import settings as S
from attnbench.report import tables as T

BACKEND = {"cudnn_benchmark": True, "tf32_cudnn": False, "tf32_matmul": False,
           "matmul_precision": "highest"}


def _row(cell, module, metric, value, unit, method="m", mode=None, batch=1, **extra):
    label = "none" if module == "none" else module.upper()
    base = R.base_row(backbone="resnet18", module=module, label=label, options={},
                      stages=None, resolution=64, batch=batch, mode=mode, device="cpu",
                      run_id="r", cell=cell)
    return R.ok_row(base, metric, value, unit, method, **extra)


def _timed(cell, module, metric, value, threads, **extra):
    unit = {"latency": "ms", "throughput": "img/s"}.get(metric, "MiB")
    return _row(cell, module, metric, value, unit,
                mode="eval", batch=2, threads=threads, amp=False, channels_last=False,
                **BACKEND, **extra)


def _flops(cell, module, uncounted):
    return [_row(cell, module, "flops", 1.0, "GMac", "fvcore+rules(x)",
                 uncounted=uncounted[0]),
            _row(cell, module, "flops", 1.02, "GMac", "ptflops-pytorch+rules(x)",
                 uncounted=uncounted[1]),
            _row(cell, module, "flops", 1.0, "GMac", "torch.utils.flop_counter+rules(x)",
                 uncounted=uncounted[2])]


def _write(tmp_path, rows, cells):
    run = tmp_path / "results" / "r"
    R.write_rows(run, rows)
    R.write_env(run, {"run_id": "r", "device": "cpu", "config_cells": cells})
    return tmp_path / "results"


def test_split_by_settings_keeps_shared_rows_in_every_part():
    a = _timed("c1", "none", "latency", 10.0, 1)
    b = _timed("c2", "none", "latency", 6.0, 2)
    partial = dict(_timed("c3", "se", "latency", 0, 2), status="failed", value=None)
    for k in BACKEND:
        partial.pop(k)
    static = _row("c4", "none", "params", 1e6, "count")
    parts = S.split_by_settings([a, b, partial, static])
    assert [name for name, _ in parts] == ["threads 1", "threads 2"]
    assert [len(rows) for _, rows in parts] == [2, 3]
    assert static in parts[0][1] and static in parts[1][1] and partial in parts[1][1]
    assert S.split_by_settings([a, static]) == [("", [a, static])]
    assert "matmul precision highest" in S.settings_line([a])


def test_memory_rows_of_another_thread_count_join_the_timed_rows_part():
    """Memory measured on 1 thread beside timing on 2 (the default matrix) is one part;
    two latencies on 1 and 2 threads are still two."""
    lat = _timed("l1", "none", "latency", 10.0, 2)
    mem = _timed("m1", "none", "peak_tensor_memory", 99.0, 1)
    parts = S.split_by_settings([lat, mem])
    assert parts == [("", [lat, mem])]
    parts = S.split_by_settings([lat, mem, _timed("l2", "none", "latency", 12.0, 1)])
    assert [name for name, _ in parts] == ["threads 1", "threads 2"]
    assert all(mem in rows for _, rows in parts)


def test_report_never_mixes_settings_and_notes_cells_left_out(tmp_path):
    rows = [_row("p1", "none", "params", 1e6, "count"),
            _timed("l1", "none", "throughput", 111.1, 1),
            _timed("l2", "none", "throughput", 222.2, 2),
            _timed("gone", "se", "throughput", 333.3, 2)]
    results = _write(tmp_path, rows, ["p1", "l1", "l2"])
    res = B.generate(results, tmp_path / "reports", formats=())
    folders = sorted(str(g.folder) for g in res.groups)
    assert folders == ["r/cpu-threads-1", "r/cpu-threads-2"]
    one = (tmp_path / "reports" / "r" / "cpu-threads-1" / "report.md").read_text()
    two = (tmp_path / "reports" / "r" / "cpu-threads-2" / "report.md").read_text()
    assert "measured with threads 1" in one and "111.1" in one and "222.2" not in one
    assert "measured with threads 2" in two and "222.2" in two and "111.1" not in two
    # the removed cell's row is in no table, and the report says so
    assert "333.3" not in two and "| SE" not in two
    assert "1 rows of 1 cells that are no longer in the run's config" in two
    assert "`gone`" in two and "**settings** (as recorded in the timed rows)" in two


def test_cpu_and_cuda_memory_have_columns_of_their_own(tmp_path):
    rows = [_timed("m1", "none", "peak_tensor_memory", 50.0, 1),
            _timed("m1", "none", "rss_increase", 3.0, 1),
            _timed("m2", "se", "peak_tensor_memory", 55.0, 1),
            _timed("m2", "se", "rss_increase", 4.0, 1)]
    idx = T.Index([dict(r, _order=i) for i, r in enumerate(rows)])
    headers = [c[0] for c in T._cost_columns(idx, "resnet18")]
    assert "tensor peak eval (MiB)" in headers and "RSS increase eval (MiB)" in headers
    assert not any(h.startswith(("mem.", "CUDA")) for h in headers)
    gpu = [dict(r, metric=m, device="cuda") for r, m in
           zip(rows, ["cuda_max_allocated", "cuda_max_reserved"] * 2)]
    idx = T.Index([dict(r, _order=i) for i, r in enumerate(gpu)])
    headers = [c[0] for c in T._cost_columns(idx, "resnet18")]
    assert "CUDA max allocated eval (MiB)" in headers and "CUDA max reserved eval (MiB)" \
        in headers and not any("tensor peak" in h for h in headers)


def test_operators_no_counter_counts_are_listed_per_module(tmp_path):
    rows = _flops("f1", "se", ("aten::mul x16; aten::sigmoid x16; aten::max_pool2d x1",
                               "__mul__ x16; sigmoid x16", "aten.mul x16; aten.sigmoid x16; "
                               "aten.relu_ x65; aten.max_pool2d_with_indices x1"))
    rows += _flops("f2", "none", ("aten::add_ x16; aten::max_pool2d x1", "add_ x16",
                                  "aten.add_ x16; aten.relu_ x49"))
    results = _write(tmp_path, rows, ["f1", "f2"])
    B.generate(results, tmp_path / "reports", formats=())
    md = (tmp_path / "reports" / "r" / "cpu" / "report.md").read_text()
    table = md.split('<a id="uncounted-ops"></a>')[1]
    se = next(line for line in table.splitlines() if line.startswith("| SE"))
    assert "mul ×16, sigmoid ×16" in se and "max_pool2d" not in se and "relu" not in se
    none = next(line for line in table.splitlines() if line.startswith("| none"))
    assert "add ×16" in none
    assert T.op_name("aten::max_pool2d x1") == T.op_name("aten.max_pool2d_with_indices x1")


def test_no_uncounted_table_without_the_torch_counter(tmp_path):
    rows = _flops("f1", "se", ("aten::mul x16", "__mul__ x16", ""))[:2]
    results = _write(tmp_path, rows, ["f1"])
    B.generate(results, tmp_path / "reports", formats=())
    assert "uncounted-ops" not in (tmp_path / "reports" / "r" / "cpu" / "report.md").read_text()


def test_a_backed_off_batch_is_reported_as_the_batch_used(tmp_path):
    rows = [_timed("l1", "none", "latency", 10.0, 1, batch_used=1)]
    results = _write(tmp_path, rows, None)
    res = B.generate(results, tmp_path / "reports", formats=())
    rec = res.groups[0].records[0]
    assert (rec["batch"], rec["batch_requested"]) == (1, 2)
    json.dumps(rec)  # still plain data


def test_a_precision_split_is_named_by_the_precision_alone():
    fp32 = _row("a", "none", "latency", 10.0, "ms", mode="eval", threads=2, amp=False,
                precision="fp32")
    bf16 = _row("b", "none", "latency", 7.0, "ms", mode="eval", threads=2, amp=True,
                precision="bf16")
    names = sorted(name for name, _ in S.split_by_settings([fp32, bf16]))
    assert names == ["precision bf16", "precision fp32"]
