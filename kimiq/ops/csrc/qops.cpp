// The fused quantized kernels of qmatmul.c as torch operators (namespace kimiq_cpu), for compiled graphs.
//
//   qlinear(x [..., K], w uint8 [N, row bytes], fmt, N) -> [..., N]              x @ W^T
//   qexperts(x [T, D], weights [T, k] fp32, idx [T, k] int64, w1, w3, w2 uint8 [E, rows, row bytes], f1, f3, f2)
//       -> [T, D]     sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = idx[t, k], ascending e
//   qrows(w uint8 [V, row bytes], ids int64 [...], fmt, D, bf16) -> [..., D]      dequantized rows (embedding)
//
// fmt indexes kimiq.ops.qmatmul.GGUF_KERNELS (the order of the tables below).  A C++ kernel behind an operator is
// what lets inductor's C++ wrapper call it with no Python in between (torch calls it through the dispatcher);
// the Python custom ops of kimiq.quant.opaque cost ~15 µs a call around a few µs of kernel.  Arithmetic follows
// the eager modules (kimiq.quant.modules): x's dtype between the projections, rounded where they round.
// Built at first use by kimiq/ops/qops.py, linked with qmatmul.c.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

extern "C" {
typedef int (*gemm_fn)(const uint8_t *, int64_t, int64_t, const void *, int64_t, void *, int, int);
typedef int (*rows_fn)(const uint8_t *, int64_t, const int64_t *, int64_t, void *, int);
#define KQ_DECL(NAME)                                                                   \
    int kq_##NAME(const uint8_t *, int64_t, int64_t, const void *, int64_t, void *, int, int); \
    int kq_rows_##NAME(const uint8_t *, int64_t, const int64_t *, int64_t, void *, int);
KQ_DECL(q8_0)
KQ_DECL(q4_0)
KQ_DECL(mxfp4)
KQ_DECL(q5_0)
KQ_DECL(q5_1)
KQ_DECL(q2_k)
KQ_DECL(q3_k)
KQ_DECL(q4_k)
KQ_DECL(q5_k)
KQ_DECL(q6_k)
}

namespace {

constexpr int64_t kMaxRows = 16;  // MMAX of qmatmul.c
const gemm_fn GEMM[] = {kq_q8_0, kq_q4_0, kq_mxfp4, kq_q5_0, kq_q5_1, kq_q2_k, kq_q3_k, kq_q4_k, kq_q5_k, kq_q6_k};
const rows_fn ROWS[] = {kq_rows_q8_0, kq_rows_q4_0, kq_rows_mxfp4, kq_rows_q5_0, kq_rows_q5_1,
                        kq_rows_q2_k, kq_rows_q3_k, kq_rows_q4_k, kq_rows_q5_k, kq_rows_q6_k};
constexpr int64_t kFormats = sizeof(GEMM) / sizeof(GEMM[0]);

void check_fmt(int64_t fmt) { TORCH_CHECK(fmt >= 0 && fmt < kFormats, "kimiq_cpu: unknown format index ", fmt); }

void check_x(const at::Tensor &x) {
    TORCH_CHECK(x.device().is_cpu(), "kimiq_cpu: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "kimiq_cpu: activations must be float32 or bfloat16, not ", x.scalar_type());
}

// y [M, N] = x [M, K] @ W^T, W the packed rows at w; M in chunks the kernel takes
void gemm(gemm_fn f, const uint8_t *w, int64_t N, int64_t K, const char *x, int64_t M, char *y, int64_t esz,
          int bf16) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t mc = std::min(kMaxRows, M - m0);
        const int rc = f(w, N, K, x + m0 * K * esz, mc, y + m0 * N * esz, bf16, at::get_num_threads());
        TORCH_CHECK(rc == 0, "kimiq_cpu: kernel refused K=", K, " (not a whole number of blocks)");
    }
}

at::Tensor qlinear(const at::Tensor &x, const at::Tensor &w, int64_t fmt, int64_t N) {
    check_fmt(fmt);
    check_x(x);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == N, "kimiq_cpu.qlinear: w must be "
                "contiguous uint8 [N, row bytes]");
    const int64_t K = x.size(-1);
    at::Tensor x2 = x.contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    gemm(GEMM[fmt], w.data_ptr<uint8_t>(), N, K, static_cast<const char *>(x2.const_data_ptr()), x2.numel() / K,
         static_cast<char *>(y.data_ptr()), x.element_size(), x.scalar_type() == at::kBFloat16);
    return y;
}

inline float round_as(float v, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }

at::Tensor qexperts(const at::Tensor &x, const at::Tensor &weights, const at::Tensor &idx, const at::Tensor &w1,
                    const at::Tensor &w3, const at::Tensor &w2, int64_t f1, int64_t f3, int64_t f2) {
    check_fmt(f1);
    check_fmt(f3);
    check_fmt(f2);
    check_x(x);
    TORCH_CHECK(x.dim() == 2 && idx.dim() == 2 && weights.sizes() == idx.sizes() && idx.size(0) == x.size(0),
                "kimiq_cpu.qexperts: x [T, D], weights and idx [T, k]");
    TORCH_CHECK(idx.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat, "kimiq_cpu.qexperts: idx "
                "int64, weights float32");
    for (const at::Tensor *w : {&w1, &w3, &w2})
        TORCH_CHECK(w->scalar_type() == at::kByte && w->is_contiguous() && w->dim() == 3, "kimiq_cpu.qexperts: "
                    "expert weights must be contiguous uint8 [E, rows, row bytes]");
    const int64_t T = x.size(0), D = x.size(1), k = idx.size(1), I = w1.size(1), E = w1.size(0);
    TORCH_CHECK(w3.size(1) == I && w2.size(1) == D && w3.size(0) == E && w2.size(0) == E,
                "kimiq_cpu.qexperts: gate/up [E, I, .], down [E, D, .]");
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const int64_t esz = x.element_size();
    at::Tensor xc = x.contiguous(), ic = idx.contiguous(), wc = weights.contiguous();
    at::Tensor out = at::empty({T, D}, x.options());
    at::Tensor h1 = at::empty({I}, x.options()), h3 = at::empty({I}, x.options()), yd = at::empty({D}, x.options());
    std::vector<float> acc(D);
    const char *xp = static_cast<const char *>(xc.const_data_ptr());
    const int64_t *ip = ic.const_data_ptr<int64_t>();
    const float *wp = wc.const_data_ptr<float>();
    const uint8_t *b1 = w1.data_ptr<uint8_t>(), *b3 = w3.data_ptr<uint8_t>(), *b2 = w2.data_ptr<uint8_t>();
    const int64_t s1 = w1.stride(0), s3 = w3.stride(0), s2 = w2.stride(0);
    for (int64_t t = 0; t < T; t++) {
        std::vector<std::pair<int64_t, float>> chosen(k);
        for (int64_t j = 0; j < k; j++) {
            chosen[j] = {ip[t * k + j], wp[t * k + j]};
            TORCH_CHECK(chosen[j].first >= 0 && chosen[j].first < E, "kimiq_cpu.qexperts: expert index out of range");
        }
        std::sort(chosen.begin(), chosen.end());  // ascending experts: the eager dispatch's summation order
        const char *xt = xp + t * D * esz;
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = chosen[j].first;
            const float we = chosen[j].second;
            gemm(GEMM[f1], b1 + e * s1, I, D, xt, 1, static_cast<char *>(h1.data_ptr()), esz, bf16);
            gemm(GEMM[f3], b3 + e * s3, I, D, xt, 1, static_cast<char *>(h3.data_ptr()), esz, bf16);
            // h = silu(h1) * h3 in x's dtype (bf16: each op rounds, as torch's)
            if (bf16) {
                auto *a = h1.data_ptr<c10::BFloat16>();
                const auto *b = h3.const_data_ptr<c10::BFloat16>();
                for (int64_t i = 0; i < I; i++) {
                    const float g = a[i];
                    a[i] = c10::BFloat16(round_as(g / (1.f + std::exp(-g)), true) * static_cast<float>(b[i]));
                }
            } else {
                float *a = h1.data_ptr<float>();
                const float *b = h3.const_data_ptr<float>();
                for (int64_t i = 0; i < I; i++) a[i] = a[i] / (1.f + std::exp(-a[i])) * b[i];
            }
            gemm(GEMM[f2], b2 + e * s2, D, I, static_cast<const char *>(h1.const_data_ptr()), 1,
                 static_cast<char *>(yd.data_ptr()), esz, bf16);
            for (int64_t d = 0; d < D; d++) {
                const float v = round_as((bf16 ? static_cast<float>(yd.const_data_ptr<c10::BFloat16>()[d])
                                               : yd.const_data_ptr<float>()[d]) * we, bf16);
                acc[d] = j == 0 ? v : round_as(acc[d] + v, bf16);
            }
        }
        if (bf16) {
            auto *o = out.data_ptr<c10::BFloat16>() + t * D;
            for (int64_t d = 0; d < D; d++) o[d] = c10::BFloat16(acc[d]);
        } else {
            std::copy(acc.begin(), acc.end(), out.data_ptr<float>() + t * D);
        }
    }
    return out;
}

at::Tensor qrows(const at::Tensor &w, const at::Tensor &ids, int64_t fmt, int64_t D, bool bf16) {
    check_fmt(fmt);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2, "kimiq_cpu.qrows: w must be "
                "contiguous uint8 [V, row bytes]");
    TORCH_CHECK(ids.scalar_type() == at::kLong, "kimiq_cpu.qrows: ids must be int64");
    at::Tensor ic = ids.contiguous();
    const int64_t R = ic.numel(), V = w.size(0);
    const int64_t *ip = ic.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < R; r++) TORCH_CHECK(ip[r] >= 0 && ip[r] < V, "kimiq_cpu.qrows: id ", ip[r], " out of "
                                                "range for ", V, " rows");
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(D);
    at::Tensor y = at::empty(shape, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    const int rc = ROWS[fmt](w.data_ptr<uint8_t>(), D, ip, R, y.data_ptr(), bf16);
    TORCH_CHECK(rc == 0, "kimiq_cpu.qrows: kernel refused D=", D);
    return y;
}

}  // namespace

TORCH_LIBRARY(kimiq_cpu, m) {
    m.def("qlinear(Tensor x, Tensor w, int fmt, int N) -> Tensor");
    m.def("qexperts(Tensor x, Tensor weights, Tensor idx, Tensor w1, Tensor w3, Tensor w2, int f1, int f3, int f2) "
          "-> Tensor");
    m.def("qrows(Tensor w, Tensor ids, int fmt, int D, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(kimiq_cpu, CPU, m) {
    m.impl("qlinear", qlinear);
    m.impl("qexperts", qexperts);
    m.impl("qrows", qrows);
}
