"""mlx-lm (0.32.2) loads kimiq's mlx export: float logits agree, quantized tensors equal mlx-lm's own quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimiq import default_model_path, load
from kimiq.cli import main
from kimiq.export.mlx import export_mlx

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module")
def ids():
    return load()[1].encode(TEXT)


def test_float_export_logits_and_tokenizer(tmp_path, ids):
    assert main(["export", "--mlx", str(tmp_path / "f32"), "--dtype", "f32"]) == 0
    model, tok = mlx_lm.load(str(tmp_path / "f32"))
    model.set_dtype(mx.float32)  # mlx's CPU expert matmul is fp32-only for unquantized weights
    theirs = np.array(model(mx.array([ids]))[0])
    ref, _ = load(dtype=torch.float32)
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0].numpy()
    # remaining gap: kv_a_layernorm eps (mlx-lm fixes 1e-5, kimiq 1e-6) and summation order
    assert np.abs(theirs - ours).max() < 1e-3
    assert tok.encode(TEXT) == ids  # tokenizer.json carries Kimi's split pattern


@pytest.mark.parametrize("recipe,mode,group,bits", [("affine4-g64", "affine", 64, 4), ("mxfp4-g32", "mxfp4", 32, 4)])
def test_quantized_export_equals_mlx_lm_quantizer(tmp_path, ids, recipe, mode, group, bits):
    export_mlx(default_model_path(), tmp_path / "bf16", log=lambda s: None)
    export_mlx(default_model_path(), tmp_path / "q", recipe=recipe, log=lambda s: None)
    theirs, _ = mlx_lm.load(str(tmp_path / "bf16"))

    def predicate(path, module):  # mlx-lm's kimi_linear default: router gates 8-bit g64
        return {"group_size": 64, "bits": 8, "mode": "affine"} if path.endswith("mlp.gate") else True

    theirs, _ = quantize_model(theirs, {}, group, bits, mode=mode, quant_predicate=predicate)
    ours, _ = mlx_lm.load(str(tmp_path / "q"))
    a, b = dict(tree_flatten(theirs.parameters())), dict(tree_flatten(ours.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert mx.array_equal(a[k], b[k]).item(), k
    out_a, out_b = (m(mx.array([ids])).astype(mx.float32) for m in (theirs, ours))
    assert mx.array_equal(out_a, out_b).item()
