"""The GPU path (``model.device``, ``model.precision``): bfloat16 autocast where asked for or where a CUDA GPU
has it, float32 otherwise; pinned batches for a GPU model. The CUDA tests skip, saying so, without one."""
from __future__ import annotations

import pytest
import torch

from pqa_core.modeling.device import autocast_dtype
from pqa_core.errors import UsageError
from pqa_core.pipeline import Pipeline
from pqa_core.training.read_phase import ReadPhaseTrainer
from pqa_core.training.loop import RecordingLogger
from test_pipeline import short_config, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_precision_resolves_per_device():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UsageError, match="config key 'model.precision' = 'fp16': must be one of auto, bf16, fp32"):
        autocast_dtype("fp16", cpu)


def test_a_read_step_under_bf16_autocast_computes_the_llm_in_bfloat16(tmp_path):
    seen = {}
    for precision in ("fp32", "bf16"):
        pipeline = Pipeline(tiny_config(tmp_path, **{"model.precision": precision}), RecordingLogger())
        trainer = ReadPhaseTrainer(pipeline.model, pipeline.config.read, retrieval_loss=pipeline.retrieval_loss,
                                   generation_loss=pipeline.generation_loss)
        dtypes = []
        hook = pipeline.model.llm.get_input_embeddings().register_forward_hook(
            lambda module, args, out: dtypes.append(out.dtype))
        layer = [m for m in pipeline.model.llm.modules() if isinstance(m, torch.nn.Linear)][0]
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        metrics = trainer.train_step(pipeline.read_dataset.collate([pipeline.read_dataset[i] for i in range(4)]))
        hook.remove()
        assert torch.isfinite(torch.tensor(metrics["total_loss"]))
        assert pipeline.model.doc_vectors.dtype == torch.float32  # weights stay float32
        seen[precision] = set(dtypes)
    assert seen["fp32"] == {torch.float32} and torch.bfloat16 in seen["bf16"]


@CUDA
def test_a_pipeline_on_the_gpu_trains_under_autocast_with_pinned_batches(tmp_path):
    config = short_config(tmp_path, **{"model.device": "cuda"})
    pipeline = Pipeline(config, RecordingLogger())
    assert pipeline.model.doc_vectors.is_cuda
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert pipeline.model.autocast_dtype == expected
    result = pipeline.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values() if isinstance(v, float))

    from pqa_core.training.loop import epoch_loader

    batch = next(iter(epoch_loader(pipeline.read_dataset, 4, 0, 0, pin_memory=True)))
    assert all(v.is_pinned() for v in batch.values() if torch.is_tensor(v))
