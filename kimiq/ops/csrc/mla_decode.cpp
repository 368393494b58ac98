// MLA's absorbed decode attention over the latent cache in one pass (kimiq_cpu::mla_decode): flash-decoding on CPU.
//
//   mla_decode(q [B, H, D], past [B, L, D] fp32 or bf16, new [B, D], lengths [B] int64, scale) -> o [B, H, D] fp32
//   o[b, h] = softmax_j(scale * q[b, h] . c_j) weighted sum of c_j over the cached rows j < lengths[b] and the new
//   row (always attended), c_j = past[b, j] or new[b]
//
// KimiMLAAttention.decode's einsums read the cache twice (scores, then values) and on CPU at long context run at a
// fraction of the memory bandwidth; here each cached row is read once from memory: blocks of rows get their scores,
// the running max / sum / output of every head are rescaled once per block (online softmax), and the block's rows
// (still in cache) are accumulated.  Threads split the rows and merge their partial softmax states.  Tested against
// the module's einsum path in tests/ops/test_qops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // rows scored before their values are accumulated (32 x D floats stay in L2)

#if defined(__AVX512F__)
inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }
#endif

struct Partial {  // one thread's softmax state for all heads: running max, sum of exp, unnormalised output
    std::vector<float> m, s, acc;
};

// G heads (h0..h0+G-1) over one block of n rows: scores with G independent accumulator chains per row, the online
// softmax update, then the rows accumulated into the G outputs (each row loaded once for the G heads)
// (rows: the block's n rows, rs floats apart; any D: the last 16 columns are masked)
template <int G>
inline void block(const float *qb, int64_t h0, int64_t D, int64_t n, const float *rows, int64_t rs, float sc,
                  Partial &st, float *sco) {
    const float *qh[G];
    float *acc[G];
    for (int g = 0; g < G; g++) qh[g] = qb + (h0 + g) * D, acc[g] = st.acc.data() + (h0 + g) * D;
    auto row_at = [&](int64_t i) { return rows + i * rs; };
    float mb[G];
    for (int g = 0; g < G; g++) mb[g] = st.m[h0 + g];
    for (int64_t i = 0; i < n; i++) {
        const float *c = row_at(i);
        float dot[G];
#if defined(__AVX512F__)
        __m512 a[G];
        for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {  // G independent FMA chains; a masked last chunk when D % 16
            const __mmask16 mk = lanes(D - d);
            const __m512 cv = mk == 0xFFFF ? _mm512_loadu_ps(c + d) : _mm512_maskz_loadu_ps(mk, c + d);
            for (int g = 0; g < G; g++)
                a[g] = _mm512_fmadd_ps(mk == 0xFFFF ? _mm512_loadu_ps(qh[g] + d) : _mm512_maskz_loadu_ps(mk, qh[g] + d),
                                       cv, a[g]);
        }
        for (int g = 0; g < G; g++) dot[g] = _mm512_reduce_add_ps(a[g]);
#else
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int64_t d = 0; d < D; d++) t += qh[g][d] * c[d];
            dot[g] = t;
        }
#endif
        for (int g = 0; g < G; g++) {
            sco[g * kBlock + i] = dot[g] * sc;
            mb[g] = std::max(mb[g], dot[g] * sc);
        }
    }
    for (int g = 0; g < G; g++) {
        const float corr = std::exp(st.m[h0 + g] - mb[g]);  // 0 on the first block (m = -inf)
        float sum = st.s[h0 + g] * corr;
        for (int64_t d = 0; d < D; d++) acc[g][d] *= corr;
        for (int64_t i = 0; i < n; i++) {
            sco[g * kBlock + i] = std::exp(sco[g * kBlock + i] - mb[g]);
            sum += sco[g * kBlock + i];
        }
        st.m[h0 + g] = mb[g];
        st.s[h0 + g] = sum;
    }
#if defined(__AVX512F__)
    for (int64_t d = 0; d < D; d += 16) {  // the G outputs' 16 columns stay in registers over the block's rows
        const __mmask16 mk = lanes(D - d);
        __m512 av[G];
        for (int g = 0; g < G; g++) av[g] = _mm512_maskz_loadu_ps(mk, acc[g] + d);
        for (int64_t i = 0; i < n; i++) {
            const __m512 cv = _mm512_maskz_loadu_ps(mk, row_at(i) + d);
            for (int g = 0; g < G; g++) av[g] = _mm512_fmadd_ps(_mm512_set1_ps(sco[g * kBlock + i]), cv, av[g]);
        }
        for (int g = 0; g < G; g++) _mm512_mask_storeu_ps(acc[g] + d, mk, av[g]);
    }
#else
    for (int64_t i = 0; i < n; i++) {
        const float *c = row_at(i);
        for (int64_t d = 0; d < D; d++)
            for (int g = 0; g < G; g++) acc[g][d] += sco[g * kBlock + i] * c[d];
    }
#endif
}

at::Tensor mla_decode(const at::Tensor &q, const at::Tensor &past, const at::Tensor &new_, const at::Tensor &lengths,
                      double scale) {
    TORCH_CHECK(q.device().is_cpu() && past.device().is_cpu(), "kimiq_cpu.mla_decode: CPU tensors only");
    TORCH_CHECK(q.dim() == 3 && past.dim() == 3 && new_.dim() == 2 && lengths.dim() == 1, "kimiq_cpu.mla_decode: q "
                "[B, H, D], past [B, L, D], new [B, D], lengths [B]");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = past.size(1);
    TORCH_CHECK(past.size(0) == B && past.size(2) == D && new_.size(0) == B && new_.size(1) == D &&
                    lengths.size(0) == B && lengths.scalar_type() == at::kLong,
                "kimiq_cpu.mla_decode: shapes or lengths dtype do not match");
    TORCH_CHECK(past.scalar_type() == at::kFloat || past.scalar_type() == at::kBFloat16, "kimiq_cpu.mla_decode: the "
                "cache must be float32 or bfloat16");
    TORCH_CHECK(past.stride(2) == 1, "kimiq_cpu.mla_decode: cache rows must be contiguous");
    const at::Tensor qf = q.to(at::kFloat).contiguous(), nf = new_.to(at::kFloat).contiguous(),
                     lc = lengths.contiguous();
    const bool bf16 = past.scalar_type() == at::kBFloat16;
    at::Tensor o = at::empty({B, H, D}, q.options().dtype(at::kFloat));
    const float sc = static_cast<float>(scale);
    const int nt = at::get_num_threads();
    for (int64_t b = 0; b < B; b++) {
        const float *qb = qf.const_data_ptr<float>() + b * H * D, *nb = nf.const_data_ptr<float>() + b * D;
        const int64_t len = std::min<int64_t>(std::max<int64_t>(lc.const_data_ptr<int64_t>()[b], 0), L);
        const char *pb = static_cast<const char *>(past.const_data_ptr()) + b * past.stride(0) * past.element_size();
        const int64_t rstride = past.stride(1);
        // threads take contiguous ranges of whole blocks; part t = rows [t*chunk, (t+1)*chunk)
        const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(nt, len / (8 * kBlock)));
        const int64_t chunk = (len + parts - 1) / parts;
        std::vector<Partial> part(parts);
        at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
            std::vector<float> row(kBlock * D), sco(H * kBlock);
            for (int64_t p = p0; p < p1; p++) {
                Partial &st = part[p];
                st.m.assign(H, -std::numeric_limits<float>::infinity());
                st.s.assign(H, 0.f);
                st.acc.assign(H * D, 0.f);
                const int64_t r1 = std::min(len, (p + 1) * chunk);
                for (int64_t r0 = p * chunk; r0 < r1; r0 += kBlock) {
                    const int64_t n = std::min(kBlock, r1 - r0);
                    const float *rows = reinterpret_cast<const float *>(pb) + r0 * rstride;  // fp32: in place
                    int64_t rs = rstride;
                    if (bf16) {  // widen the block's rows once
                        for (int64_t i = 0; i < n; i++) {
                            const c10::BFloat16 *src = reinterpret_cast<const c10::BFloat16 *>(pb) + (r0 + i) * rstride;
                            for (int64_t d = 0; d < D; d++) row[i * D + d] = static_cast<float>(src[d]);
                        }
                        rows = row.data(), rs = D;
                    }
                    for (int64_t h0 = 0; h0 < H; h0 += 4) {
                        if (H - h0 >= 4) block<4>(qb, h0, D, n, rows, rs, sc, st, sco.data());
                        else
                            for (int64_t h = h0; h < H; h++) block<1>(qb, h, D, n, rows, rs, sc, st, sco.data());
                    }
                }
            }
        });
        // merge the parts and the new row (always attended)
        float *ob = o.data_ptr<float>() + b * H * D;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = qb + h * D;
            float sn = 0.f;
            for (int64_t d = 0; d < D; d++) sn += qh[d] * nb[d];
            sn *= sc;
            float M = sn;
            for (const Partial &st : part) M = std::max(M, st.m[h]);
            const float wn = std::exp(sn - M);
            float sum = wn;
            float *oh = ob + h * D;
            for (int64_t d = 0; d < D; d++) oh[d] = wn * nb[d];
            for (const Partial &st : part) {
                if (st.s[h] == 0.f) continue;  // no rows (m = -inf)
                const float w = std::exp(st.m[h] - M);
                sum += st.s[h] * w;
                const float *acc = st.acc.data() + h * D;
                for (int64_t d = 0; d < D; d++) oh[d] += w * acc[d];
            }
            const float inv = 1.f / sum;
            for (int64_t d = 0; d < D; d++) oh[d] *= inv;
        }
    }
    return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kimiq_cpu, m) {
    m.def("mla_decode(Tensor q, Tensor past, Tensor new, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kimiq_cpu, CPU, m) { m.impl("mla_decode", mla_decode); }
