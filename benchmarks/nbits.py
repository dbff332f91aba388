"""ONNX Runtime's weight-only low-bit peer: ``MatMulNBits`` (com.microsoft).

ORT's own converter (``matmul_nbits_quantizer``) needs the ``onnx_ir`` package;
this module writes the same operator directly, so the peer needs nothing beyond
onnx and onnxruntime. Every MatMul (and every ``Gemm`` with ``transB=1``, alpha
and beta 1, as ``torch.onnx.export`` writes a Linear on a 2-D input) whose
weight is a 2-D float initializer becomes ``MatMulNBits`` with symmetric
per-block scales: ``w[n, k] = (q - 2**(bits-1)) * scale[n, k // block]``, ``q``
in ``[0, 2**bits)``, packed little-end first within each byte (the layout of
ORT's ``MatMulNBits``: ``B[N, blocks, block * bits / 8]``). Activations stay
float: a weight-only peer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["quantize_nbits", "pack_nbits"]


def pack_nbits(w_nk: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B uint8[N, blocks, block*bits/8], scales float32[N * blocks])`` of ``w[N, K]``."""
    n, k = w_nk.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w_nk
    grouped = padded.reshape(n, blocks, block)
    qmax = (1 << (bits - 1)) - 1
    scale = np.abs(grouped).max(axis=2) / max(qmax, 1)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(grouped / scale[..., None]), -qmax - 1, qmax).astype(np.int64) + (1 << (bits - 1))
    per_byte = 8 // bits
    q = q.reshape(n, blocks, block // per_byte, per_byte)
    packed = np.zeros(q.shape[:-1], np.int64)
    for i in range(per_byte):
        packed |= q[..., i] << (bits * i)
    return packed.astype(np.uint8), scale.astype(np.float32).reshape(-1)


def quantize_nbits(fp32_path: Path, out_path: Path, bits: int, block: int = 32) -> Path:
    """Write ``out_path``: ``fp32_path`` with its weight matmuls as ``MatMulNBits``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, replaced = [], 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_name = node.input[1] if len(node.input) > 1 else ""
        gemm_ok = node.op_type == "Gemm" and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0) \
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type not in ("MatMul",) and not gemm_ok or w_name not in inits:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if w.ndim != 2:
            nodes.append(node)
            continue
        w_nk = w if node.op_type == "Gemm" else w.T
        n, k = w_nk.shape
        packed, scales = pack_nbits(w_nk, bits, block)
        b_name, s_name = f"{w_name}_nbits{bits}", f"{w_name}_nbits{bits}_scale"
        g.initializer.extend([numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)])
        out = node.output[0] if node.op_type == "MatMul" or len(node.input) < 3 else f"{node.output[0]}_nobias"
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], [out], domain="com.microsoft",
                                      name=f"{node.name}_nbits", K=k, N=n, bits=bits, block_size=block))
        if out != node.output[0]:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        replaced += 1
    if not replaced:
        raise ValueError(f"{fp32_path}: no MatMul/Gemm with a 2-D weight initializer")
    del g.node[:]
    g.node.extend(nodes)
    used = {i for nd in g.node for i in nd.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return Path(out_path)
