// Registers svpt's fused ops with the torch dispatcher as torch.ops.svpt_cpp.*: a forward and a
// backward per differentiable op (attention_saliency has no gradient), CPU kernels always, CUDA
// kernels when built with nvcc (SVPT_WITH_CUDA). The autograd wiring (torch.autograd.Function,
// first-order only) and the fake kernels for torch.compile are in svpt_kernels/cpp.py; at the
// Autograd key the ops only run below autograd (below_autograd), so none returns tensors with
// autograd history.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
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

// Schemas: "(a!)" marks the buffer an op writes in place (only the rows it changes).
TORCH_LIBRARY(svpt_cpp, m) {
  m.def("da_mix_fwd(Tensor(a!) tokens, Tensor prompts, Tensor weight, Tensor bias, int num_prefix) -> Tensor");
  m.def(
      "da_mix_bwd(Tensor(a!) grad, Tensor prev, Tensor prompts, Tensor weight, Tensor bias, int num_prefix)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_saliency(Tensor q, Tensor k, float scale, int row_start, int row_count, int col_start)"
      " -> Tensor");
  m.def(
      "ae_update_fwd(Tensor(a!) h, Tensor saliency, Tensor scale, int num_prefix, int num_prompts, int k)"
      " -> (Tensor, Tensor)");
  m.def(
      "ae_update_bwd(Tensor(a!) grad, Tensor mean, Tensor index, Tensor scale, int num_prefix, int num_prompts)"
      " -> Tensor");
  m.def("prompt_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
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
      " bool bias_grad, bool add_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("build_info() -> str", &build_info);
}

// Every op with kernels, as X(name).
#define SVPT_OPS(X)                                                                                          \
  X(da_mix_fwd) X(da_mix_bwd) X(attention_saliency) X(ae_update_fwd) X(ae_update_bwd) X(prompt_attention_fwd) \
  X(prompt_attention_bwd) X(prompt_kv_attention_fwd) X(prompt_kv_attention_bwd) X(folded_cross_attention_fwd)  \
  X(folded_cross_attention_bwd)

#define SVPT_IMPL_CPU(name) m.impl(#name, &svpt::name##_cpu);
TORCH_LIBRARY_IMPL(svpt_cpp, CPU, m) { SVPT_OPS(SVPT_IMPL_CPU) }

#ifdef SVPT_WITH_CUDA
#define SVPT_IMPL_CUDA(name) m.impl(#name, &svpt::name##_cuda);
TORCH_LIBRARY_IMPL(svpt_cpp, CUDA, m) { SVPT_OPS(SVPT_IMPL_CUDA) }
#endif

namespace {
// Every op's Autograd kernel. The kernels record no gradient (the autograd Functions of
// svpt_kernels/cpp.py do), so they run below autograd and what they return does not require grad.
// A buffer an op writes in place gets its version bumped (if a tensor saved for backward is
// overwritten, backward says so); one that requires grad is refused while grad mode is on, since
// the write would not be recorded in the graph.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const at::Tensor& t = (*stack)[first + i].toTensor();
    TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op.schema().name(), " writes ", args[i].name(),
                " in place and records no gradient, but ", args[i].name(),
                " requires grad: call it through svpt_kernels.cpp (svpt.ops), whose autograd Functions record it");
    t.unsafeGetTensorImpl()->bump_version();
  }
  const at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

#define SVPT_IMPL_AUTOGRAD(name) m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
TORCH_LIBRARY_IMPL(svpt_cpp, Autograd, m) { SVPT_OPS(SVPT_IMPL_AUTOGRAD) }

// Importing svpt_kernels._C loads this library, which registers the ops above; the Python
// module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
