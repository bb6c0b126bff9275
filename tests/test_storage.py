"""How the doc-vector table is stored: bfloat16 tables updated by stochastic rounding (small updates
still move them, untouched rows stay bit-identical, a resumed run rounds as an uninterrupted one),
checkpoints that never hold a second copy of a large table, tables memory-mapped from a file."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from pqa_core.training.optim import RowwiseAdamW
from pqa_core.storage.tensor_files import create_mapped, map_tensor


def rowwise(table, lr):
    return RowwiseAdamW([{"params": [table], "lr": lr, "rowwise": True}])


def step_on_rows(table, optimizer, rows, grad_value=1.0):
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.embedding(torch.tensor(rows), table, sparse=True).sum().mul(grad_value).backward()
    optimizer.step()


def test_a_bfloat16_table_follows_small_updates_on_average_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    start = (0.25 + 0.25 * torch.rand(50, 64)) * torch.randn(50, 64).sign()  # bfloat16 spacing here: 2e-3
    wide = torch.nn.Parameter(start.clone())
    half = torch.nn.Parameter(start.to(torch.bfloat16))
    nearest = torch.nn.Parameter(start.to(torch.bfloat16))
    opt_wide, opt_half, opt_nearest = rowwise(wide, 1e-4), rowwise(half, 1e-4), rowwise(nearest, 1e-4)
    untouched = half.detach()[30:].clone()
    rows = list(range(30))
    for _ in range(30):  # each update is ~1e-4, far below half of bfloat16's spacing
        step_on_rows(wide, opt_wide, rows)
        step_on_rows(half, opt_half, rows)
        with torch.no_grad():  # what round-to-nearest would store: the same update, rounded back
            nearest[:30] = (nearest[:30].float() - 1e-4).to(torch.bfloat16)
    moved_wide = (wide.detach()[:30] - start[:30]).mean()
    moved_half = (half.detach()[:30].float() - start.to(torch.bfloat16)[:30].float()).mean()
    assert float(moved_wide) == pytest.approx(-30e-4, rel=0.05)
    assert float(moved_half) == pytest.approx(float(moved_wide), rel=0.1)  # unbiased
    assert torch.equal(nearest.detach()[:30], start.to(torch.bfloat16)[:30])  # round-to-nearest: never moves
    assert torch.equal(half.detach()[30:], untouched)
    assert opt_half.state[half]["exp_avg"].dtype == torch.bfloat16


def test_bfloat16_rounding_resumes_exactly(tmp_path):
    from pqa_core.storage.checkpoints import _flatten_optimizer, _unflatten_optimizer

    torch.manual_seed(1)
    start = (torch.randn(20, 8) * 0.3).to(torch.bfloat16)
    reference = torch.nn.Parameter(start.clone())
    opt = rowwise(reference, 1e-3)
    for i in range(6):
        step_on_rows(reference, opt, [i % 5, 7])
    resumed = torch.nn.Parameter(start.clone())
    first = rowwise(resumed, 1e-3)
    for i in range(3):
        step_on_rows(resumed, first, [i % 5, 7])
    tensors, meta = _flatten_optimizer(first)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    table = resumed.detach().clone()
    resumed = torch.nn.Parameter(table)
    second = rowwise(resumed, 1e-3)
    second.load_state_dict(_unflatten_optimizer(load_file(str(tmp_path / "optimizer.safetensors")), meta))
    for i in range(3, 6):
        step_on_rows(resumed, second, [i % 5, 7])
    assert torch.equal(resumed, reference)


def test_a_pipeline_with_a_bfloat16_table_trains_and_its_checkpoint_loads_into_float32(tmp_path):
    from test_pipeline import short_config

    from pqa_core.storage.checkpoints import load_checkpoint
    from pqa_core.pipeline import Pipeline
    from pqa_core.training.loop import RecordingLogger

    pipeline = Pipeline(short_config(tmp_path, **{"model.doc_dtype": "bfloat16", "phases": ["write"]}),
                        RecordingLogger())
    before = pipeline.model.doc_vectors.detach().clone()
    pipeline.run()
    table = pipeline.model.doc_vectors
    assert table.dtype == torch.bfloat16 and not torch.equal(table.detach(), before)
    final = tmp_path / "run" / "checkpoints" / "write" / "final"
    assert load_file(str(final / "model.safetensors"))["doc_vectors"].dtype == torch.bfloat16
    other = Pipeline(short_config(tmp_path, "other", phases=["write"]), RecordingLogger())
    load_checkpoint(final, other.model)
    assert other.model.doc_vectors.dtype == torch.float32
    assert torch.equal(other.model.doc_vectors.detach(), table.detach().float())


def test_a_mapped_table_is_written_through_to_its_file(tmp_path):
    table = create_mapped(tmp_path / "t.safetensors", "doc_vectors", (1000, 16), torch.bfloat16)
    assert table.shape == (1000, 16) and float(table.float().abs().sum()) == 0
    table[17] = 2.5
    del table
    assert load_file(str(tmp_path / "t.safetensors"))["doc_vectors"][17].float().tolist() == [2.5] * 16
    assert map_tensor(tmp_path / "t.safetensors", "doc_vectors")[17].float().tolist() == [2.5] * 16


def test_a_checkpoint_of_a_large_table_and_its_optimizer_state_holds_no_second_copy(tmp_path):
    """Peak memory of a process checkpointing a 200 MB table with 400 MB of row-wise Adam moments:
    what it held before plus little, not a second copy of either."""
    script = textwrap.dedent(f"""
        import torch
        from pqa_core.storage.checkpoints import save_checkpoint
        from pqa_core.training.optim import RowwiseAdamW

        class Model(torch.nn.Module):  # what a checkpoint reads of a ParametricQA
            def __init__(self):
                super().__init__()
                self.doc_vectors = torch.nn.Parameter(torch.ones(50_000, 1024))
                self.z_to_embedding, self.selector, self.query_encoder = (torch.nn.Linear(2, 2),
                                                                          torch.nn.Identity(), torch.nn.Identity())
                self.writer = torch.nn.Identity()
            num_docs = 50_000
            def lora_parameters(self):
                return []

        model = Model()
        optimizer = RowwiseAdamW([{{"params": [model.doc_vectors], "lr": 0.1, "rowwise": True}}])
        torch.nn.functional.embedding(torch.tensor([3]), model.doc_vectors, sparse=True).sum().backward()
        optimizer.step()
        rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
        before = rss("VmRSS")
        save_checkpoint({str(tmp_path / 'ckpt')!r}, model, optimizer, step=1, epoch=0)
        print(rss("VmHWM") - before)
    """)
    grown_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.strip())
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB while checkpointing 600 MB"
    assert (tmp_path / "ckpt" / "optimizer.safetensors").stat().st_size > 400_000_000


def test_a_memory_mapped_table_trains_as_the_same_table_in_memory(tmp_path, dtype="bfloat16"):
    from test_pipeline import short_config

    from pqa_core.pipeline import Pipeline
    from pqa_core.training.loop import RecordingLogger

    runs = {}
    for storage in ("memory", "mmap"):
        config = short_config(tmp_path, storage, phases=["write", "read"], **{
            "model.doc_dtype": dtype, "model.doc_storage": storage, "model.doc_init": "minilm"})
        runs[storage] = Pipeline(config, RecordingLogger())
        runs[storage].run()
    mapped = runs["mmap"].model.doc_vectors
    assert mapped.untyped_storage().filename == str(tmp_path / "mmap" / "tables" / "rank-0" / "doc_vectors.safetensors")
    assert runs["memory"].model.doc_vectors.untyped_storage().filename is None
    assert mapped.dtype == getattr(torch, dtype)
    assert torch.equal(mapped, runs["memory"].model.doc_vectors)
    # the file holds the table as trained (the mapping writes through)
    assert torch.equal(map_tensor(mapped.untyped_storage().filename, "doc_vectors"), mapped.detach())


def test_a_mapped_table_cut_short_is_one_line_naming_the_file_not_a_sigbus(tmp_path):
    """Issue 19: a memory-mapped table truncated while a run reads it was a SIGBUS (exit 135, no message,
    the run left RUNNING). The mapped files' sizes are checked before each training step and evaluation
    batch: a truncated table is an EnvironmentFailure naming it (the run is then stored FAILED), before
    any page past the file's end is read. A file too short to hold its tensor is refused before mapping."""
    from test_pipeline import short_config

    from pqa_core.errors import EnvironmentFailure
    from pqa_core.pipeline import Pipeline
    from pqa_core.storage.tensor_files import check_mapped, create_mapped
    from pqa_core.training.loop import RecordingLogger

    pipeline = Pipeline(short_config(tmp_path, "mmap", **{"model.doc_storage": "mmap"}), RecordingLogger())
    table = tmp_path / "mmap" / "tables" / "rank-0" / "doc_vectors.safetensors"
    assert pipeline.model.doc_vectors.untyped_storage().filename == str(table)
    os.truncate(table, 64)
    with pytest.raises(EnvironmentFailure, match=rf"^{table}: memory-mapped table cut to 64 bytes while the run "
                                                 r"used it \(\d+ needed\); the run stops"):
        pipeline.run()
    with pytest.raises(EnvironmentFailure, match=rf"^{table}: memory-mapped table cut to 64 bytes"):
        check_mapped()
    other = tmp_path / "other.safetensors"
    create_mapped(other, "t", (4, 4), torch.float32)
    from pqa_core.storage.tensor_files import read_header

    short = read_header(other)[1] + 8  # the header and two of the 16 floats
    os.truncate(other, short)
    with pytest.raises(EnvironmentFailure, match=rf"^{other}: {short} bytes, but tensor t needs {short + 56}: "
                                                 "the file is truncated"):
        map_tensor(other, "t")
    os.truncate(table, 1 << 20)  # later tests in this process check every mapped file: both whole again
    os.truncate(other, short + 56)
