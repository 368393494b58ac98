// One KDA decode step as a torch operator (kimiq_cpu::kda_step), in place on the fp32 recurrent state.
//
//   kda_step(S [B, H, K, V] fp32 (mutated), q [B, H, K], k [B, H, K], v [B, H, V], g [B, H, K] fp32 log-decay,
//            beta [B, H] fp32, scale) -> o [B, H, V] fp32
//
//   S' = diag(exp(g)) S;  S = S' + beta k (v - S'^T k)^T;  o = scale S^T q      (kimiq/ops/kda.py's recurrence)
//
// Per (row, head) two passes over that head's [K, V] state (64 KiB at K = V = 128, so the second pass reads it
// from L2): decay + k^T S', then the rank-1 update + q^T S.  The graph the compiler makes of recurrent_kda reads
// and writes the state four or five times.  Tested against naive_recurrent_kda in tests/ops/test_qops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

at::Tensor kda_step(at::Tensor &S, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &g,
                    const at::Tensor &beta, double scale) {
    TORCH_CHECK(S.device().is_cpu() && S.scalar_type() == at::kFloat && S.is_contiguous() && S.dim() == 4,
                "kimiq_cpu.kda_step: S must be a contiguous fp32 CPU tensor [B, H, K, V]");
    const int64_t B = S.size(0), H = S.size(1), K = S.size(2), V = S.size(3);
    TORCH_CHECK(q.sizes() == at::IntArrayRef({B, H, K}) && k.sizes() == q.sizes() && g.sizes() == q.sizes() &&
                    v.sizes() == at::IntArrayRef({B, H, V}) && beta.sizes() == at::IntArrayRef({B, H}),
                "kimiq_cpu.kda_step: q, k, g [B, H, K], v [B, H, V], beta [B, H]");
    const at::Tensor qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous(),
                     vf = v.to(at::kFloat).contiguous(), gf = g.to(at::kFloat).contiguous(),
                     bf = beta.to(at::kFloat).contiguous();
    at::Tensor o = at::empty({B, H, V}, S.options());
    float *s0 = S.data_ptr<float>(), *o0 = o.data_ptr<float>();
    const float *qp = qf.const_data_ptr<float>(), *kp = kf.const_data_ptr<float>(), *vp = vf.const_data_ptr<float>(),
                *gp = gf.const_data_ptr<float>(), *bp = bf.const_data_ptr<float>();
    const float sc = static_cast<float>(scale);
    const int64_t grain = std::max<int64_t>(1, 65536 / (K * V));  // heads per task: threads only for big states
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> u(V), d(V);
        for (int64_t bh = begin; bh < end; bh++) {
            float *s = s0 + bh * K * V, *out = o0 + bh * V;
            const float *qh = qp + bh * K, *kh = kp + bh * K, *vh = vp + bh * V, *gh = gp + bh * K;
            std::fill(u.begin(), u.end(), 0.f);
            for (int64_t i = 0; i < K; i++) {  // S' = diag(exp(g)) S, u = S'^T k
                float *row = s + i * V;
                const float a = std::exp(gh[i]), ki = kh[i];
                for (int64_t j = 0; j < V; j++) {
                    row[j] *= a;
                    u[j] += ki * row[j];
                }
            }
            const float b = bp[bh];
            for (int64_t j = 0; j < V; j++) {
                d[j] = b * (vh[j] - u[j]);
                out[j] = 0.f;
            }
            for (int64_t i = 0; i < K; i++) {  // S = S' + k d^T, o = scale S^T q
                float *row = s + i * V;
                const float ki = kh[i], qi = qh[i] * sc;
                for (int64_t j = 0; j < V; j++) {
                    row[j] += ki * d[j];
                    out[j] += qi * row[j];
                }
            }
        }
    });
    return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kimiq_cpu, m) {
    m.def("kda_step(Tensor(a!) S, Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kimiq_cpu, CPU, m) { m.impl("kda_step", kda_step); }
