// Registers svpt's fused ops with the torch dispatcher as torch.ops.svpt_cpp.*:
// a forward and a backward per op, CPU kernels always, CUDA kernels when built with nvcc
// (SVPT_WITH_CUDA). The autograd wiring is in svpt_kernels/cpp.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "svpt.h"

#ifndef SVPT_TORCH_VERSION
#define SVPT_TORCH_VERSION unknown
#endif
#define SVPT_STR2(x) #x
#define SVPT_STR(x) SVPT_STR2(x)

namespace {
std::string build_info() {
#ifdef SVPT_WITH_CUDA
  return "built against torch " SVPT_STR(SVPT_TORCH_VERSION) " (CPU kernels; CUDA archs " SVPT_STR(SVPT_CUDA_ARCHS) ")";
#else
  return "built against torch " SVPT_STR(SVPT_TORCH_VERSION) " (CPU kernels only)";
#endif
}

bool has_cuda() {
#ifdef SVPT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(svpt_cpp, m) {
  m.def("da_mix_fwd(Tensor tokens, Tensor prompts, Tensor weight, Tensor bias, int num_prefix) -> Tensor");
  m.def(
      "da_mix_bwd(Tensor grad, Tensor tokens, Tensor prompts, Tensor weight, Tensor bias, int num_prefix)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prompt_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int sal_start, int sal_count, int sal_cols)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "prompt_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "prompt_kv_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, float scale)"
      " -> (Tensor, Tensor)");
  m.def(
      "prompt_kv_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v,"
      " Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "folded_cross_attention_fwd(Tensor x, Tensor w_logits, Tensor? b_logits, Tensor w_values, Tensor? bias,"
      " Tensor? residual, bool add_x) -> Tensor");
  m.def(
      "folded_cross_attention_bwd(Tensor grad, Tensor x, Tensor w_logits, Tensor? b_logits, Tensor w_values,"
      " bool has_bias, bool add_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ae_update_fwd(Tensor tokens, Tensor attn_out, Tensor saliency, Tensor scale, int num_prefix, int num_prompts,"
      " int k) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ae_update_bwd(Tensor grad, Tensor rows, Tensor mean, Tensor scale, int num_prefix, int num_prompts)"
      " -> (Tensor, Tensor)");
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(svpt_cpp, CPU, m) {
  m.impl("da_mix_fwd", &svpt::da_mix_fwd_cpu);
  m.impl("da_mix_bwd", &svpt::da_mix_bwd_cpu);
  m.impl("prompt_attention_fwd", &svpt::prompt_attention_fwd_cpu);
  m.impl("prompt_attention_bwd", &svpt::prompt_attention_bwd_cpu);
  m.impl("prompt_kv_attention_fwd", &svpt::prompt_kv_attention_fwd_cpu);
  m.impl("prompt_kv_attention_bwd", &svpt::prompt_kv_attention_bwd_cpu);
  m.impl("folded_cross_attention_fwd", &svpt::folded_cross_attention_fwd_cpu);
  m.impl("folded_cross_attention_bwd", &svpt::folded_cross_attention_bwd_cpu);
  m.impl("ae_update_fwd", &svpt::ae_update_fwd_cpu);
  m.impl("ae_update_bwd", &svpt::ae_update_bwd_cpu);
}

#ifdef SVPT_WITH_CUDA
TORCH_LIBRARY_IMPL(svpt_cpp, CUDA, m) {
  m.impl("da_mix_fwd", &svpt::da_mix_fwd_cuda);
  m.impl("da_mix_bwd", &svpt::da_mix_bwd_cuda);
  m.impl("prompt_attention_fwd", &svpt::prompt_attention_fwd_cuda);
  m.impl("prompt_attention_bwd", &svpt::prompt_attention_bwd_cuda);
  m.impl("prompt_kv_attention_fwd", &svpt::prompt_kv_attention_fwd_cuda);
  m.impl("prompt_kv_attention_bwd", &svpt::prompt_kv_attention_bwd_cuda);
  m.impl("folded_cross_attention_fwd", &svpt::folded_cross_attention_fwd_cuda);
  m.impl("folded_cross_attention_bwd", &svpt::folded_cross_attention_bwd_cuda);
  m.impl("ae_update_fwd", &svpt::ae_update_fwd_cuda);
  m.impl("ae_update_bwd", &svpt::ae_update_bwd_cuda);
}
#endif

// Importing svpt_kernels._C loads this library, which registers the ops above; the Python
// module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
