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
#include <memory>
#include <utility>
#include <vector>

extern "C" {
typedef int (*gemm_fn)(const uint8_t *, int64_t, int64_t, const void *, int64_t, void *, int, int);
typedef int (*rows_fn)(const uint8_t *, int64_t, const int64_t *, int64_t, void *, int);
struct kq_act;
typedef void (*range_fn)(const uint8_t *, int64_t, int64_t, int64_t, const kq_act *, float *, int64_t);
kq_act *kq_act_new(const void *, int64_t, int64_t, int, int);
void kq_act_free(kq_act *);
#define KQ_DECL(NAME)                                                                                   \
    int kq_##NAME(const uint8_t *, int64_t, int64_t, const void *, int64_t, void *, int, int);         \
    int kq_rows_##NAME(const uint8_t *, int64_t, const int64_t *, int64_t, void *, int);                \
    void kq_range_##NAME(const uint8_t *, int64_t, int64_t, int64_t, const kq_act *, float *, int64_t); \
    int kq_act_kind_##NAME(void);                                                                       \
    int kq_block_##NAME(void);
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
#define KQ_TABLE(P) {P##q8_0, P##q4_0, P##mxfp4, P##q5_0, P##q5_1, P##q2_k, P##q3_k, P##q4_k, P##q5_k, P##q6_k}
const gemm_fn GEMM[] = KQ_TABLE(kq_);
const rows_fn ROWS[] = KQ_TABLE(kq_rows_);
const range_fn RANGE[] = KQ_TABLE(kq_range_);
int (*const KIND[])(void) = KQ_TABLE(kq_act_kind_);
int (*const BLOCK[])(void) = KQ_TABLE(kq_block_);
constexpr int64_t kFormats = sizeof(GEMM) / sizeof(GEMM[0]);

// activations prepared once (kq_act_new), freed with the scope
struct Act {
    kq_act *a;
    Act(const void *x, int64_t M, int64_t K, bool bf16, int kinds) : a(kq_act_new(x, M, K, bf16, kinds)) {
        TORCH_CHECK(a != nullptr, "kimiq_cpu: kernel refused K=", K, " (not a whole number of blocks)");
    }
    ~Act() { kq_act_free(a); }
    Act(const Act &) = delete;
    Act &operator=(const Act &) = delete;
};

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

// One token's routed experts: gate and up rows of all k chosen experts in one parallel pass (one activation
// quantization, one fork/join), then the down rows of all k, each thread summing its output slice over the experts
// in ascending order (the eager dispatch's order), rounding where the eager modules round (bf16).
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
    TORCH_CHECK(D % BLOCK[f1]() == 0 && D % BLOCK[f3]() == 0 && I % BLOCK[f2]() == 0, "kimiq_cpu.qexperts: D=", D,
                " or I=", I, " not a whole number of blocks");
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const int64_t esz = x.element_size();
    at::Tensor xc = x.contiguous(), ic = idx.contiguous(), wc = weights.contiguous();
    at::Tensor out = at::empty({T, D}, x.options());
    std::vector<float> gu(2 * k * I), h(k * I), down(k * D);
    const char *xp = static_cast<const char *>(xc.const_data_ptr());
    const int64_t *ip = ic.const_data_ptr<int64_t>();
    const float *wp = wc.const_data_ptr<float>();
    const uint8_t *b1 = w1.data_ptr<uint8_t>(), *b3 = w3.data_ptr<uint8_t>(), *b2 = w2.data_ptr<uint8_t>();
    const int64_t s1 = w1.stride(0), s3 = w3.stride(0), s2 = w2.stride(0);
    const range_fn r1 = RANGE[f1], r3 = RANGE[f3], r2 = RANGE[f2];
    for (int64_t t = 0; t < T; t++) {
        std::vector<std::pair<int64_t, float>> chosen(k);
        for (int64_t j = 0; j < k; j++) {
            chosen[j] = {ip[t * k + j], wp[t * k + j]};
            TORCH_CHECK(chosen[j].first >= 0 && chosen[j].first < E, "kimiq_cpu.qexperts: expert index out of range");
        }
        std::sort(chosen.begin(), chosen.end());  // ascending experts: the eager dispatch's summation order
        const Act ax(xp + t * D * esz, 1, D, bf16, KIND[f1]() | KIND[f3]());
        // gate and up: 2k matrices of I rows, as one range of 2kI rows (segment s: expert s / 2, up if s odd)
        at::parallel_for(0, 2 * k * I, 64, [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end;) {
                const int64_t seg = r / I, row = r % I, n = std::min(end - r, I - row), e = chosen[seg / 2].first;
                if (seg % 2 == 0) r1(b1 + e * s1, D, row, row + n, ax.a, gu.data() + r, 0);
                else r3(b3 + e * s3, D, row, row + n, ax.a, gu.data() + r, 0);
                r += n;
            }
        });
        // h = silu(gate) * up in x's dtype (bf16: the projections' outputs and each op rounded, as torch's)
        for (int64_t j = 0; j < k; j++) {
            const float *g = gu.data() + 2 * j * I, *u = g + I;
            float *hj = h.data() + j * I;
            for (int64_t i = 0; i < I; i++) {
                const float a = round_as(g[i], bf16);
                hj[i] = bf16 ? round_as(round_as(a / (1.f + std::exp(-a)), true) * round_as(u[i], true), true)
                             : a / (1.f + std::exp(-a)) * u[i];
            }
        }
        std::vector<std::unique_ptr<Act>> ah;
        for (int64_t j = 0; j < k; j++) ah.push_back(std::make_unique<Act>(h.data() + j * I, 1, I, false, KIND[f2]()));
        float *o = bf16 ? nullptr : out.data_ptr<float>() + t * D;
        c10::BFloat16 *ob = bf16 ? out.data_ptr<c10::BFloat16>() + t * D : nullptr;
        at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
            for (int64_t j = 0; j < k; j++)
                r2(b2 + chosen[j].first * s2, I, d0, d1, ah[j]->a, down.data() + j * D + d0, 0);
            for (int64_t d = d0; d < d1; d++) {
                float acc = 0.f;
                for (int64_t j = 0; j < k; j++) {
                    const float v = round_as(round_as(down[j * D + d], bf16) * chosen[j].second, bf16);
                    acc = j == 0 ? v : round_as(acc + v, bf16);
                }
                if (bf16) ob[d] = c10::BFloat16(acc);
                else o[d] = acc;
            }
        });
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
