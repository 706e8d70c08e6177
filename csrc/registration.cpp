// The single TORCH_LIBRARY block: every expertflow op schema. Implementations register per
// device in csrc/ops/<topic>_{cpu,cuda}; Python fake kernels live in expertflow/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(expertflow, m) {
  m.def(
      "topk_gating(Tensor router_logits, int top_k, str scoring='softmax', bool renormalize=True, "
      "Tensor? correction_bias=None, int n_group=1, int topk_group=1, "
      "float routed_scaling_factor=1.0, bool softmax_after_topk=False) -> (Tensor, Tensor)");
  m.def("group_by_expert(Tensor topk_ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("combine(Tensor expert_outputs, Tensor topk_weights, Tensor inverse) -> Tensor");
  // Expert weight formats to float32/bfloat16/float16 (semantics: expertflow/formats).
  m.def("dequantize_int8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  m.def("dequantize_int4(Tensor packed, Tensor scale, int group_size, ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_fp8_block(Tensor weight, Tensor scale_inv, int block_rows, int block_cols, "
      "ScalarType dtype) -> Tensor");
  m.def("dequantize_mxfp4(Tensor blocks, Tensor scales, ScalarType dtype) -> Tensor");
  m.def(
      "cpu_expert(Tensor x, Tensor[] up, Tensor? up_bias, Tensor[] down, Tensor? down_bias, "
      "str format, str activation, bool transposed=False, float alpha=1.702, float limit=7.0, "
      "int[] fp8_block=[128, 128]) -> Tensor");
}
