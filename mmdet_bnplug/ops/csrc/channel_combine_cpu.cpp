// CPU kernel of mmdet_bnplug::channel_combine (schema, fake and PyTorch implementations:
// mmdet_bnplug/ops/channel_combine.py), registered for the CPU key; declared in
// channel_combine.h for mabn_cpu.cpp's train_backward, which calls it directly.
//
// out = a[c] * dy + b[c] * x + c[c]: the input gradient of a norm layer as a per-channel
// affine combination of dy and x, in ONE pass over memory (ATen's kernels need two: BN's
// eval kernel for b * x + c, then addcmul_ for a * dy). The fused pass serves contiguous
// fp32/fp64 dy and x with a, b, c of their dtype; anything else (channels_last or other
// strides, fp16/bf16 input with fp32 coefficients) takes those two ATen passes.
#include "channel_combine.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace mmdet_bnplug {
namespace {

using at::Tensor;

// Elements per parallel task: below this a call runs on the calling thread (FPN P7,
// 2x256x7x11, is 39k values: a thread hand-off would cost more than the pass).
constexpr int64_t kGrainElements = 1 << 16;

// A (C,) tensor viewed as (1, C, 1, ...) to broadcast over a rank-``dim`` input.
Tensor channel_view(const Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return v.view(shape);
}

void check_args(const Tensor& dy, const Tensor& x, const Tensor& a, const Tensor& b,
                const Tensor& c) {
  const char* op = "channel_combine";
  TORCH_CHECK(x.is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(dy.is_cpu() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              op, ": dy must be a CPU tensor of x's shape and dtype (", x.sizes(), ", ",
              x.scalar_type(), "), got ", dy.sizes(), ", ", dy.scalar_type(), " on ",
              dy.device());
  const auto dtype = a.scalar_type();
  const auto stats = at::promote_types(x.scalar_type(), at::kFloat);
  TORCH_CHECK(dtype == x.scalar_type() || dtype == stats, op,
              ": a must have x's dtype or the statistics dtype ", stats, ", got ", dtype);
  const std::pair<const char*, const Tensor*> coeffs[] = {{"a", &a}, {"b", &b}, {"c", &c}};
  for (const auto& [name, t] : coeffs) {
    TORCH_CHECK(t->is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
                t->device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name,
                " must have shape (", x.size(1), ",) (x's channels), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " must have a's dtype ", dtype,
                ", got ", t->scalar_type());
  }
}

// The one pass, for contiguous dy, x, out of N * C rows of ``inner`` values each.
template <typename T>
void fused(const T* dy, const T* x, const T* a, const T* b, const T* c, T* out, int64_t N,
           int64_t C, int64_t inner) {
  if (inner == 1) {  // (N, C): a row is one sample, the coefficients vary along it
    const int64_t grain = std::max<int64_t>(1, kGrainElements / C);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* g = dy + n * C;
        const T* v = x + n * C;
        T* o = out + n * C;
        for (int64_t j = 0; j < C; ++j) o[j] = a[j] * g[j] + (b[j] * v[j] + c[j]);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElements / inner);
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ch = row % C;
      const T av = a[ch], bv = b[ch], cv = c[ch];
      const T* g = dy + row * inner;
      const T* v = x + row * inner;
      T* o = out + row * inner;
      for (int64_t j = 0; j < inner; ++j) o[j] = av * g[j] + (bv * v[j] + cv);
    }
  });
}

// The two ATen passes (the layers' former computation): b * x + c by BN's eval kernel
// (mean 0, variance 1, eps 0; fp32 coefficients with half x), or, for channels_last input
// of the coefficients' dtype, a broadcast multiply-add (faster there); then addcmul_.
Tensor two_passes(const Tensor& dy, const Tensor& x, const Tensor& a, const Tensor& b,
                  const Tensor& c) {
  const int64_t dim = x.dim();
  Tensor out;
  if (dim > 2 && x.scalar_type() == b.scalar_type() &&
      x.suggest_memory_format() != at::MemoryFormat::Contiguous) {
    out = at::empty_like(x);
    at::addcmul_out(out, channel_view(c, dim), x, channel_view(b, dim));
  } else {
    out = at::batch_norm(x, b, c, at::zeros_like(b), at::ones_like(b), false, 0.0, 0.0,
                         false);
  }
  const Tensor scale = a.scalar_type() == x.scalar_type() ? a : a.to(x.scalar_type());
  return out.addcmul_(dy, channel_view(scale, dim));
}

}  // namespace

Tensor channel_combine_cpu(const Tensor& dy, const Tensor& x, const Tensor& a, const Tensor& b,
                           const Tensor& c) {
  check_args(dy, x, a, b, c);
  if (x.numel() == 0) return at::empty_like(x);
  const auto dtype = x.scalar_type();
  if (!(x.is_contiguous() && dy.is_contiguous() && a.scalar_type() == dtype &&
        (dtype == at::kFloat || dtype == at::kDouble))) {
    return two_passes(dy, x, a, b, c);
  }
  const Tensor out = at::empty_like(x);  // contiguous in memory, as x
  const Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "channel_combine", [&] {
    fused<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                    cc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C,
                    x.numel() / (N * C));
  });
  return out;
}

}  // namespace mmdet_bnplug

TORCH_LIBRARY_IMPL(mmdet_bnplug, CPU, m) {
  m.impl("channel_combine", TORCH_FN(mmdet_bnplug::channel_combine_cpu));
}
