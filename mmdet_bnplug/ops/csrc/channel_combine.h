// mmdet_bnplug::channel_combine's CPU kernel (channel_combine_cpu.cpp), for the other
// kernels of the extension to call directly (not through the dispatcher).
#pragma once

#include <ATen/ATen.h>

namespace mmdet_bnplug {

// a[c] * dy + b[c] * x + c[c] for dy, x of shape (N, C, *), a, b, c of shape (C,); the
// schema, the checks and the PyTorch implementation: mmdet_bnplug/ops/channel_combine.py.
at::Tensor channel_combine_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& b, const at::Tensor& c);

}  // namespace mmdet_bnplug
